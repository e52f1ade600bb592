//! The Secondary's `on-io-error detach` and the failover (checker 9).
//!
//! **Detach.** When a replicated write fails on the Secondary's disk, the Secondary (its
//! node's `Event::WriteFailed`, as in the daemon) marks the blocks in its bitmap, records
//! the failure durably with the blocks' bitmap pages (its metadata says Inconsistent: a
//! restart comes back Inconsistent)
//! and goes `Failed` before its `P_NEG_ACK` leaves; from then on every peer write is
//! answered `P_NEG_ACK` without disk IO. It tells the Primary (`P_STATE`, on the meta
//! stream: the Primary starts a generation the Secondary lacks) and, after
//! [`LEAVE_DELAY`] ticks, leaves the connection (StandAlone). The operator re-attaches it
//! (a restart of the node's daemon, 50 … 1500 ticks later, once its local writes are
//! done): a new Receiver, the disk Inconsistent, and the next handshake makes it
//! SyncTarget. The Primary completes a write whose peer part got `P_NEG_ACK` from its
//! own disk and marks it out of sync (its core's rule). A failed resync write is the
//! resync's business (failed blocks, the operator reconnects), as in the daemon.
//!
//! **Failover.** On every seed the Primary's node dies for good: on about a third of
//! the seeds at a random moment (a random time after a drawn request count), on the
//! others at the end, after checkers 1 … 8 passed. Its IO never completes, the
//! connection goes, requests in flight have an unknown outcome; the Secondary's own
//! local writes finish. Then the operator runs `primary` on the Secondary, which is
//! promoted only if the daemon's rules allow it (its node's
//! [`crate::replica::Node::may_promote`]) and the model's operator agrees; a promotion
//! runs the node's events (`Admin::Promote`, `sim/roles.rs`) and must
//! start a generation the dead Primary never had:
//!
//! 1. its disk is not `Failed` (refusal [`Refusal::Failed`]);
//! 2. its disk is UpToDate: not a SyncTarget or a node whose handshake decided a resync
//!    (DRBD: WFBitMapT / WFSyncUUID / SyncTarget clamp the disk to ≤ Outdated), not
//!    re-attached after a failure, not left Inconsistent by a resync with failed blocks
//!    ([`Refusal::NotUpToDate`]);
//! 3. it was connected when the Primary died ([`Refusal::Disconnected`]). This is the
//!    model's operator, not a rule of tandem: tandem has no fencing, so a Secondary
//!    that was disconnected while the Primary went on writing still says UpToDate and
//!    tandem (like DRBD without fencing) would promote it, losing the writes the
//!    Primary made alone. The model never promotes a disconnected Secondary; it counts
//!    how often promoting it would have lost acknowledged writes
//!    (`failover_stale_if_promoted`), which is the size of that hole.
//!
//! Checker 9: a promoted Secondary's disk holds, in every sector, the last write the
//! application got success for (the reference image; or a write whose outcome the death
//! made unknown; sectors whose last write failed locally are not checked). Protocol C:
//! every sector. Protocols A and B complete a write before the Secondary has it; what
//! was still in the network when the Primary died (sent on this connection, not
//! received by the Secondary) may be lost, as DRBD's protocols A and B lose it by
//! design. What the Secondary received it applies, also after the connection is gone
//! (DRBD 8.4 submits on receipt; `request::Receiver`): a protocol B write acked with
//! `P_RECV_ACK` survives the Primary's death. A
//! refusal must name one of the three rules, with the facts behind it, and at the end
//! of a run (everything in sync) the Secondary must be promoted.

use super::rng::{mix, Rng};
use super::{Ev, MetaMsg, Sim, SECTORS, UNKNOWN};
use crate::replica::{Action, FlushRounds, LocalWrite};
use crate::state::{DiskState, Protocol};
use crate::wire::Packet;
use std::collections::BTreeSet;

/// Ticks from a Secondary's disk failure to its leaving the connection (the daemon
/// waits until its `P_NEG_ACK` and `P_STATE` are in the socket, `Link::sent`, at most
/// 200 ms).
const LEAVE_DELAY: u64 = 20;

/// Why the operator's `primary` on the Secondary was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    Failed,
    NotUpToDate,
    Disconnected,
}

/// What the Primary's death left to judge.
#[derive(Debug)]
struct Death {
    connected: bool,
    wf_sync: bool,
    /// Requests in flight at the death (outcome unknown).
    unknown: BTreeSet<u64>,
    /// Writes sent on this connection that the Secondary had not received.
    in_net: BTreeSet<u64>,
    at_end: bool,
}

/// The Secondary's failure state and the failover (see the module docs).
pub(super) struct Fo {
    rng: Rng,
    /// The Primary dies this long after this many requests were issued; None: at the end.
    after_ops: Option<u32>,
    scheduled: bool,
    /// The Primary's node is gone for good.
    pub(super) dead: bool,
    death: Option<Death>,
    /// The Secondary's metadata says Inconsistent (a failure was recorded).
    md_inconsistent: bool,
    /// Peer writes that failed on the Secondary since it was last attached.
    failed_since_attach: u64,
    /// The Secondary left the connection after a failure and waits to be re-attached.
    pub(super) standalone: bool,
    /// The handshake made the Secondary SyncTarget and its `P_SYNC_UUID` has not come
    /// (DRBD: WFBitMapT / WFSyncUUID; its disk is ≤ Outdated from the handshake on).
    pub(super) wf_sync: bool,
    /// Writes (request ids) sent on this connection that have not landed on the
    /// Secondary's disk.
    pub(super) to_s: BTreeSet<u64>,
    /// Of those, the ones the Secondary has not received yet (still in the network):
    /// the only ones a Primary's death may take from it under protocols A and B (a
    /// received write is applied even after the connection is lost).
    pub(super) in_net: BTreeSet<u64>,
    /// The Secondary daemon's incarnation (+1 per re-attach).
    pub(super) s_inc: u64,
}

impl Fo {
    /// Drawn from a stream of its own, so the other parameters stay what they were.
    pub(super) fn new(seed: u64, max_ops: u32) -> Self {
        let mut rng = Rng::new(mix(seed ^ 0x6661_696c_6f76));
        let after_ops = rng
            .chance(333_333)
            .then(|| u32::try_from(rng.range(1, u64::from(max_ops.max(1)))).unwrap_or(1));
        Fo {
            rng,
            after_ops,
            scheduled: false,
            dead: false,
            death: None,
            md_inconsistent: false,
            failed_since_attach: 0,
            standalone: false,
            wf_sync: false,
            to_s: BTreeSet::new(),
            in_net: BTreeSet::new(),
            s_inc: 0,
        }
    }
}

impl Fo {
    /// The nodes traded places (a switchover, at quiescence): the new Secondary's disk
    /// has no failure on record and nothing is in flight to it.
    pub(super) fn trade_places(&mut self) {
        self.md_inconsistent = false;
        self.failed_since_attach = 0;
        self.standalone = false;
        self.wf_sync = false;
        self.to_s.clear();
        self.in_net.clear();
    }
}

impl Sim {
    /// The Secondary's Receiver is replaced: its counts go to the report.
    pub(super) fn account_receiver_stats(&mut self) {
        let rx = self.sn.receiver.stats();
        self.report.writes_held += rx.writes_held;
        self.report.writes_after_loss += rx.writes_after_loss;
    }

    /// The Secondary's peer writes are not all on its disk: some in flight, or received
    /// and not applied yet (a lost connection's too, `request::Receiver`).
    pub(super) fn s_writes_pending(&self) -> bool {
        let rx = self.sn.receiver.stats();
        rx.active_writes != 0 || rx.held != 0
    }

    /// Whether the Secondary's disk takes IO (not detached).
    pub(super) fn s_disk_usable(&self) -> bool {
        self.sn.disk != DiskState::Failed
    }

    /// A peer write `w` failed on the Secondary's disk (or was refused by a detached
    /// one: not `attempted`), through the node ([`Event::WriteFailed`], on-io-error
    /// detach): the failure
    /// recorded (durable first, `MDF_CONSISTENT` cleared; the model has no superblock)
    /// with the write's bits in the bitmap pages, then the write completes (`P_NEG_ACK`)
    /// and, on the first failure, the Primary learns the disk state and the Secondary
    /// leaves the connection.
    pub(super) fn secondary_write_failed(
        &mut self,
        w: &LocalWrite,
        attempted: bool,
    ) -> Result<(), String> {
        self.fo.failed_since_attach += 1;
        let (failure, out) = self.node_write_failed(false, w, attempted)?;
        if let Some(f) = failure {
            if f.disk != DiskState::Failed || f.full_sync() {
                return Err(format!("a Secondary's failed write made its disk {f:?}"));
            }
            self.report.s_detaches += 1;
            self.fo.md_inconsistent = true;
        }
        for a in out {
            match a {
                Action::Send {
                    pkt: pkt @ Packet::State(_),
                    ..
                } => self.send_meta(MetaMsg::State(pkt))?,
                Action::DetachedStandAlone => self.at(LEAVE_DELAY, Ev::SLeave),
                a => self.actions.push(a),
            }
        }
        self.pump_secondary()
    }

    /// The detached Secondary leaves the connection and stays StandAlone until the
    /// operator re-attaches it.
    pub(super) fn s_leave(&mut self) -> Result<(), String> {
        self.fo.standalone = true;
        if self.up {
            self.drop_connection()?;
        }
        let d = self.fo.rng.range(50, 1500);
        self.at(d, Ev::SReattach);
        Ok(())
    }

    /// The operator restarts the Secondary's daemon: the disk attaches again,
    /// Inconsistent (its metadata says so), and the node connects.
    pub(super) fn s_reattach(&mut self) -> Result<(), String> {
        if self.fo.dead {
            return Ok(()); // the operator is busy with the failover: it stays as it is
        }
        if self.s_writes_pending() || !self.s_bufs.is_empty() {
            self.at(10, Ev::SReattach); // the old daemon's writes finish first
            return Ok(());
        }
        if !self.fo.md_inconsistent {
            return Err("re-attach of a disk whose failure was not recorded".into());
        }
        #[allow(unused_mut)]
        let mut secondary = self.params.receiver()?;
        #[cfg(test)]
        {
            secondary.sabotage = self.sabotage.receiver;
        }
        // (The old receiver's counts go to the report first.)
        self.account_receiver_stats();
        self.sn.receiver = secondary;
        self.sn.flushes = FlushRounds::default();
        #[cfg(test)]
        {
            self.sn.flushes.sabotage_join_running = self.sabotage.flush_round_takes_late_requests;
        }
        self.fo.s_inc += 1;
        self.sn.disk_attached(DiskState::Inconsistent);
        self.fo.standalone = false;
        self.fo.failed_since_attach = 0;
        self.report.s_reattaches += 1;
        if !self.reconnect_pending && !self.fo.dead {
            self.reconnect_pending = true;
            self.at(1, Ev::Reconnect);
        }
        Ok(())
    }

    /// A resync finished on the Secondary and made it UpToDate: its metadata says
    /// consistent again.
    pub(super) fn s_consistent_again(&mut self) {
        self.fo.md_inconsistent = false;
    }

    /// Schedules the mid-run death once its request count is reached.
    pub(super) fn maybe_schedule_failover(&mut self) {
        if !self.fo.scheduled && self.fo.after_ops.is_some_and(|k| self.issued >= k) {
            self.fo.scheduled = true;
            let d = self.fo.rng.range(0, 300);
            self.at(d, Ev::Failover);
        }
    }

    /// The Primary's node dies for good.
    pub(super) fn failover(&mut self, at_end: bool) -> Result<(), String> {
        if self.fo.dead {
            return Ok(());
        }
        self.fo.dead = true;
        self.report.failovers += 1;
        let mut unknown = BTreeSet::new();
        for (i, op) in self.ops.iter_mut().enumerate() {
            if !op.done {
                op.done = true;
                op.snapshot = None;
                unknown.insert(i as u64);
            }
        }
        self.outstanding = 0;
        self.fo.death = Some(Death {
            connected: self.up,
            wf_sync: self.fo.wf_sync,
            unknown,
            in_net: std::mem::take(&mut self.fo.in_net),
            at_end,
        });
        // Its IO never completes (the incarnation changes), its resync machines go.
        self.inc += 1;
        self.primary_down = true;
        self.p_tags.clear();
        self.meta_io.clear();
        self.primary_crashed();
        self.connection_gone_with_primary()?;
        Ok(())
    }

    /// The Secondary's promotion after the death, by the rules in the module docs: the
    /// daemon's (its node's [`crate::replica::Node::may_promote`]: not connected, its
    /// local writes done), then the model operator's.
    fn judge(&self, d: &Death) -> Result<(), Refusal> {
        // A handshake that decided a resync clamps the disk to ≤ Outdated (DRBD's
        // WFBitMapT / WFSyncUUID; the daemon decides and starts a run in one step).
        if d.wf_sync && self.sn.disk == DiskState::UpToDate {
            return Err(Refusal::NotUpToDate);
        }
        match self.sn.may_promote(false) {
            Err(crate::replica::Refusal::DiskFailed(_)) => Err(Refusal::Failed),
            Err(_) => Err(Refusal::NotUpToDate),
            Ok(()) if !d.connected => Err(Refusal::Disconnected),
            Ok(()) => Ok(()),
        }
    }

    /// Checker 9, once the Secondary's local writes are done.
    pub(super) fn check_failover(&mut self) -> Result<(), String> {
        let d = self.fo.death.take().ok_or("checker 9 without a failover")?;
        if self.s_writes_pending() || !self.sn.runs.idle() {
            return Err("checker 9: the secondary is not idle after the failover".into());
        }
        match self.judge(&d) {
            Ok(()) => {
                self.report.failover_promoted += 1;
                // The operator's `primary`, by the daemon's sequence: a generation the
                // dead Primary never had.
                let old = self.sn.uuids;
                super::resync::promote_alone(&mut self.sn, &mut self.fo.rng, &mut self.actions)
                    .map_err(|e| format!("checker 9: the promotion the rules allow: {e}"))?;
                if old.bitmap == 0 && self.sn.uuids.current & !1 == old.current & !1 {
                    return Err("checker 9: the promoted secondary kept its generation".into());
                }
                self.lost_by_promotion(&d).map_or(Ok(()), |e| {
                    Err(format!(
                        "checker 9: the promoted secondary lost an acknowledged write ({} \
                         failover): {e}",
                        if d.at_end { "end-of-run" } else { "mid-run" }
                    ))
                })
            }
            Err(why) => {
                // The facts behind the refusal.
                let disk = self.sn.disk;
                let holds = match why {
                    Refusal::Failed => disk == DiskState::Failed && self.fo.failed_since_attach > 0,
                    Refusal::NotUpToDate => {
                        (disk != DiskState::UpToDate && disk != DiskState::Failed) || d.wf_sync
                    }
                    Refusal::Disconnected => !d.connected,
                };
                if !holds || d.at_end {
                    return Err(format!(
                        "checker 9: promotion refused ({why:?}) {}: disk {disk}, connected {}, \
                         resync pending {}",
                        if d.at_end {
                            "at the end of a run in sync"
                        } else {
                            "without its facts"
                        },
                        d.connected,
                        d.wf_sync
                    ));
                }
                match why {
                    Refusal::Failed => self.report.failover_refused_failed += 1,
                    Refusal::NotUpToDate => self.report.failover_refused_inconsistent += 1,
                    Refusal::Disconnected => {
                        self.report.failover_refused_disconnected += 1;
                        if self.lost_by_promotion(&d).is_some() {
                            self.report.failover_stale_if_promoted += 1;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// The first sector whose acknowledged content the Secondary's disk lacks, if any.
    fn lost_by_promotion(&self, d: &Death) -> Option<String> {
        let ab = self.params.protocol != Protocol::C;
        for s in 0..SECTORS {
            let v = self.ref_ver[s];
            if v == UNKNOWN || (ab && d.in_net.contains(&v)) {
                continue;
            }
            let have = self.sdisk.cache_ver[s];
            // By content: a checksum resync leaves equal data under another version.
            let ok = |w: u64| {
                super::sector_is(
                    self.sdisk.cache_sector(s),
                    w,
                    s,
                    w == 0 || !self.write_has_data(w),
                )
            };
            if ok(v) || (d.unknown.contains(&have) && ok(have)) {
                continue;
            }
            return Some(format!(
                "sector {s}: the last completed write is {v}, the secondary holds version {have}{}",
                if ok(have) { "" } else { " (with other bytes)" }
            ));
        }
        None
    }
}
