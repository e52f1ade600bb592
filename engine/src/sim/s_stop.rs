//! The Secondary's stop during a resync and its restart (checker 12).
//!
//! On about a quarter of the seeds, the first SyncTarget run that starts draws a stop of
//! the Secondary's node a random time later: a clean stop (`Volume::shutdown`) on half of
//! them, a power loss on the others. The clean stop waits for a moment the Secondary has
//! no IO in flight (tried again every few ticks, at most [`MAX_TRIES`] times); the
//! connection drops, the data disk is flushed under the bitmap's flush protocol
//! (`OutOfSync::begin_flush` / `flush_done`), every dirty bitmap page is written and the
//! metadata is marked clean. The power loss comes right after the Secondary's next bitmap
//! page write-back (the classic crash point after a metadata write), or 50 … 400 ticks
//! later if none came: the connection drops, the Secondary's IO in flight never
//! completes, its disk keeps what is durable (`cache := durable`) and the metadata what
//! was written. The Secondary's metadata device gets its
//! bitmap pages where the daemon writes them: the merged bitmap before the first resync
//! write, a `SyncAction::WriteBack` after a flush that covers the clears (the flush takes
//! time: resync writes complete during it), the end of a run after its flush. The
//! restart is the daemon's attach: a new node whose core loaded the on-disk bitmap, the
//! same UUIDs and disk state (the model has no superblock: they are durable when
//! assigned), then a reconnect, whose handshake resumes the resync from the union of
//! both bitmaps.
//!
//! Checked at the restart: every block whose content differs between the two disks is
//! set in the Primary's bitmap or the restarted Secondary's (a page image keeps a resync
//! clear set until a flush issued after its write completed, `OutOfSync`'s rule:
//! without it a power loss after a page write loses a block no bitmap marks, since the
//! SyncSource cleared its bit on the ack); after a clean stop, the restarted bitmap is
//! exactly the one at the stop (the stop wrote what the resync cleared: the restart
//! resumes there, it does not start over).

use super::rng::Rng;
use super::{Ev, Sim, SECTORS, SECTORS_PER_BLOCK, VOLUME_BYTES};
use crate::replica::{Durable, Node};
use crate::request::{OutOfSync, Primary, SECTOR};
use crate::state::{DiskState, Role};

/// Attempts to find the Secondary without IO in flight.
const MAX_TRIES: u32 = 40;

/// The stop's draw for one seed (a stream of its own).
#[derive(Debug)]
pub(super) struct SStop {
    rng: Rng,
    /// `Some(clean)`: a stop is due at the next target start; `None`: none (or done).
    pub(super) due: Option<bool>,
    /// A power loss waits for the next bitmap page write of the Secondary (the moment
    /// right after a metadata write), or for its fallback time.
    armed: bool,
}

impl SStop {
    pub(super) fn new(seed: u64) -> Self {
        let (mut rng, happens) = Rng::scenario(seed, 0x0073_7374_6f70, 250_000);
        let due = happens.then(|| rng.chance(500_000));
        SStop {
            rng,
            due,
            armed: false,
        }
    }
}

impl Sim {
    /// `Volume::shutdown` of a node (`primary_node`: the Primary's): its clean-stop plan
    /// (`Node::clean_stop_plan`: a flush of its data disk under the bitmap's flush
    /// protocol, every dirty bitmap page unless `skip_pages` (a sabotage), the metadata
    /// marked clean).
    pub(super) fn clean_stop(
        &mut self,
        primary_node: bool,
        skip_pages: bool,
    ) -> Result<(), String> {
        let node = if primary_node { &self.pn } else { &self.sn };
        let mut plan = node
            .clean_stop_plan()
            .map_err(|e| format!("a clean stop of an idle node refused: {e}"))?;
        if skip_pages {
            plan.retain(|s| *s != Durable::Pages);
        }
        self.persist(primary_node, &plan)?;
        Ok(())
    }

    /// A target run started: the stop, if one is due, is scheduled.
    pub(super) fn maybe_schedule_s_stop(&mut self) {
        if let Some(clean) = self.ss.due.take() {
            let d = self.ss.rng.range(1, 400);
            self.at(d, Ev::SStop { clean, tries: 0 });
        }
    }

    /// The Secondary's IO in flight, as events not yet delivered.
    fn s_io_in_flight(&self) -> bool {
        self.s_writeback.is_some() || self.events.iter().any(|s| is_s_io(&s.ev))
    }

    /// The stop event (see the module docs): a clean stop waits until the Secondary has
    /// no IO in flight; a power loss is armed at its first firing and comes right after
    /// the next bitmap page write, or at the second firing.
    pub(super) fn s_stop(&mut self, clean: bool, tries: u32) -> Result<(), String> {
        if !self.s_stop_possible() {
            self.ss.armed = false;
            return Ok(()); // another fault came first
        }
        if !clean {
            if tries == 0 {
                self.ss.armed = true;
                let d = self.ss.rng.range(50, 400);
                self.at(d, Ev::SStop { clean, tries: 1 });
                return Ok(());
            }
            if !std::mem::take(&mut self.ss.armed) {
                return Ok(()); // it came after a page write
            }
            return self.s_stop_now(false);
        }
        if self.s_io_in_flight() || self.s_writes_pending() {
            if tries < MAX_TRIES {
                let d = self.ss.rng.range(1, 20);
                let tries = tries + 1;
                self.at(d, Ev::SStop { clean, tries });
            }
            return Ok(());
        }
        self.s_stop_now(true)
    }

    /// A power loss armed by the stop event comes now (right after a page write).
    pub(super) fn s_pages_written(&mut self) -> Result<(), String> {
        if std::mem::take(&mut self.ss.armed) && self.s_stop_possible() {
            return self.s_stop_now(false);
        }
        Ok(())
    }

    fn s_stop_possible(&self) -> bool {
        self.up
            && !self.fo.dead
            && !self.fo.standalone
            && !self.primary_down
            && self.check6.is_none()
            && self.sn.role == Role::Secondary
            && self.sn.disk != DiskState::Failed
    }

    /// The stop, its restart and checker 12. A power loss takes the Secondary's IO in
    /// flight with it (it never completes) and the peer writes it held.
    fn s_stop_now(&mut self, clean: bool) -> Result<(), String> {
        self.report.s_stops += 1;
        self.drop_connection()?;
        // The old node's resync clock stops with it; after a power loss, its IO too.
        let events = std::mem::take(&mut self.events);
        self.events = events
            .into_iter()
            .filter(|s| !matches!(s.ev, Ev::RsTick { .. }) && (clean || !is_s_io(&s.ev)))
            .collect();
        if !clean {
            self.s_bufs.clear();
            self.rs.s_finish = None;
        }
        let at_stop = if clean && self.sn.clean_stop_plan().is_ok() {
            self.s_clean_stop()?;
            Some(self.sn.primary.out_of_sync().clone())
        } else if clean {
            // The node refuses a clean stop after a failed metadata write (from its days
            // as Primary): as in the daemon, only the data is flushed and the metadata
            // stays unclean; the restart applies its activity log.
            self.persist(false, &[Durable::FlushData])?;
            None
        } else {
            self.report.s_power_losses += 1;
            self.sdisk.crash();
            // What comes back may be ahead of the Primary, as after that crash (checker 6).
            self.allow_secondary_ahead();
            None
        };
        self.s_restarted()?;
        self.check12(at_stop.as_ref(), clean)
    }

    /// `Volume::shutdown` on the Secondary ([`Self::clean_stop`]).
    fn s_clean_stop(&mut self) -> Result<(), String> {
        #[cfg(test)]
        let skip = self.sabotage.clean_stop_skips_pages;
        #[cfg(not(test))]
        let skip = false;
        self.clean_stop(false, skip)
    }

    /// The target asks for its cleared bits on disk (`SyncAction::WriteBack`): a flush
    /// under the bitmap's flush protocol (it takes time: resync writes complete during
    /// it), then the pages. One at a time (a request while one runs is left to the next).
    pub(super) fn s_write_back(&mut self) {
        if self.s_writeback.is_some() {
            return;
        }
        self.s_writeback = Some(self.sn.primary.out_of_sync_mut().begin_flush());
        let covers = self.sdisk.completions;
        let fail = self.rng.chance(self.params.fail_ppm[3]);
        let d = self.rng.range(1, self.params.disk_delay.1);
        self.at(d, Ev::SWriteBack { covers, fail });
    }

    /// The write-back's flush completed (`fail`): with success the pages follow; a
    /// failed flush takes nothing (the pages keep the bits set on disk). (A stop waits
    /// for it: the node that asked is the one here.)
    pub(super) fn s_write_back_done(&mut self, covers: u64, fail: bool) -> Result<(), String> {
        let id = self
            .s_writeback
            .take()
            .ok_or("a write-back flush nobody started")?;
        if !fail {
            self.sdisk.flush(covers);
        }
        if let Some(id) = id {
            self.sn.primary.out_of_sync_mut().flush_done(id, !fail);
        }
        if fail {
            return Ok(());
        }
        // The plan's first step is the flush above (an event of its own: it takes time
        // and may fail); the pages follow.
        let plan = Node::write_back_plan();
        if plan.first() != Some(&Durable::FlushData) {
            return Err(format!("a write-back flushes first: {plan:?}"));
        }
        self.persist(false, &plan[1..])?;
        self.s_pages_written()
    }

    /// The restarted Secondary's node: its core loaded the bitmap the attach read.
    fn s_restarted(&mut self) -> Result<(), String> {
        let a = self
            .s_meta_dev
            .attach(SECTORS as u64, self.params.extent_shift)?;
        let pcfg = self.params.primary_config(&self.s_meta_dev.layout, 0);
        #[allow(unused_mut)]
        let mut primary = Primary::new(pcfg).map_err(|e| format!("restart: {e}"))?;
        #[allow(unused_mut)]
        let mut receiver = self.params.receiver()?;
        #[cfg(test)]
        {
            primary.sabotage = self.sabotage.primary;
            receiver.sabotage = self.sabotage.receiver;
        }
        primary
            .load_bitmap(a.bitmap)
            .map_err(|e| format!("secondary restart: load_bitmap: {e}"))?;
        #[allow(unused_mut)]
        let mut node = Node::new(primary, receiver, self.sn.uuids, self.sn.disk);
        #[cfg(test)]
        super::sabotage_secondary_node(&self.sabotage, &mut node);
        self.account_receiver_stats();
        self.sn = node;
        self.fo.s_inc += 1;
        self.s_writeback = None;
        Ok(())
    }

    /// Checker 12 (see the module docs).
    fn check12(&self, at_stop: Option<&OutOfSync>, clean: bool) -> Result<(), String> {
        let what = if clean { "clean stop" } else { "power loss" };
        let bytes = SECTORS_PER_BLOCK * SECTOR as usize;
        let (p, s) = (self.pn.primary.out_of_sync(), self.sn.primary.out_of_sync());
        // A block under one of the Primary's local writes still in flight may differ for
        // now: the Secondary may have that write already (a barrier-acked write, which
        // no connection loss marks, retires only once its local part lands too).
        let landing = |b: u64| {
            self.p_tags.values().any(|&(sector, len)| {
                let first = sector / SECTORS_PER_BLOCK as u64;
                let last = (sector + u64::from(len / SECTOR) - 1) / SECTORS_PER_BLOCK as u64;
                (first..=last).contains(&b)
            })
        };
        for b in 0..VOLUME_BYTES / bytes {
            let r = b * bytes..(b + 1) * bytes;
            let b64 = b as u64;
            if self.pdisk.cache[r.clone()] != self.sdisk.cache[r]
                && !landing(b64)
                && !p.is_set(b64)
                && !s.is_set(b64)
                && !self.rs.s_only(b64)
            {
                return Err(format!(
                    "checker 12: after the Secondary's {what} during a resync block {b} \
                     differs and no bitmap marks it"
                ));
            }
            if let Some(bm) = at_stop {
                if bm.is_set(b64) != s.is_set(b64) {
                    return Err(format!(
                        "checker 12: block {b} is {} in the bitmap the clean stop left and \
                         {} in the restarted one",
                        bm.is_set(b64),
                        s.is_set(b64)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// An event that completes the Secondary's IO.
fn is_s_io(ev: &Ev) -> bool {
    matches!(
        ev,
        Ev::SDiskWrite { .. }
            | Ev::SDiskFlush { .. }
            | Ev::SRead { .. }
            | Ev::SRsWrite(_)
            | Ev::SFinishFlush { .. }
            | Ev::SWriteBack { .. }
    )
}
