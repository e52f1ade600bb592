//! A clean stop of the Primary's node and its restart (checker 15).
//!
//! On about one seed in eight, a random time (1 … 3,000 ticks) into the run, the
//! operator stops the Primary's daemon cleanly (`Volume::shutdown`): the application
//! stops issuing, and the stop waits until every request has completed and the node has
//! no IO in flight (tried again every few ticks, at most [`MAX_TRIES`] times; then the
//! stop is dropped and the application resumes). Then the connection drops (the core
//! marks every write the peer has not barrier-acked), the data disk is flushed under the
//! bitmap's flush protocol, every dirty bitmap page is written and the metadata is
//! marked clean (the activity log re-initialised, the Primary indicator cleared). The
//! restart is the daemon's attach: no activity log to apply, no new crash of a Primary
//! (an earlier one not yet repaired stays recorded), promoted alone by the operator;
//! then checker 6 and the reconnect, as after a crash. All of that is the node's plan
//! (`Node::clean_stop_plan`); after a failed metadata write the node refuses it, as the
//! daemon does: only the data is flushed, the metadata stays as after a crash, and the
//! restart applies the activity log and records a crash (checker 6 only; before the
//! plan, the simulator marked such metadata clean where the daemon does not).
//!
//! Checked (checker 15): no activity log is left to apply, and the restarted bitmap is
//! exactly the one at the stop (a clean stop keeps every block the peer may lack and,
//! with no log to replay, adds none). Checker 6 then finds every block that differs in a
//! bitmap.

use super::rng::Rng;
use super::{Ev, Sim, SECTORS};
use crate::replica::Durable;
use crate::state::Role;

/// Attempts to find the Primary with nothing in flight.
const MAX_TRIES: u32 = 40;

/// The stop's draw for one seed (a stream of its own).
#[derive(Debug)]
pub(super) struct PStop {
    rng: Rng,
    due: bool,
    /// The application waits for the stop.
    pub(super) stopping: bool,
}

impl PStop {
    pub(super) fn new(seed: u64) -> Self {
        let (rng, due) = Rng::scenario(seed, 0x7073_746f_7021, 125_000);
        PStop {
            rng,
            due,
            stopping: false,
        }
    }
}

impl Sim {
    /// At the start of the run: the stop, if this seed has one.
    pub(super) fn maybe_schedule_p_stop(&mut self) {
        if std::mem::take(&mut self.ps.due) {
            let d = self.ps.rng.range(1, 3000);
            self.at(d, Ev::PStop { tries: 0 });
        }
    }

    /// The stop event (see the module docs).
    pub(super) fn p_stop(&mut self, tries: u32) -> Result<(), String> {
        let possible = !self.primary_down
            && self.check6.is_none()
            && !self.fo.dead
            && !self.crash_scheduled
            && self.pn.role == Role::Primary
            && self.issued < self.max_ops;
        let p = self.pn.primary.stats();
        let idle = self.outstanding == 0
            && p.in_flight_writes == 0
            && p.in_flight_flushes == 0
            && p.al_waiting == 0
            && self.meta_io.is_empty()
            && self.p_tags.is_empty()
            && self.pn.runs.idle();
        if possible && idle {
            self.ps.stopping = false;
            return self.p_stop_now();
        }
        if possible && tries < MAX_TRIES {
            self.ps.stopping = true;
            let d = self.ps.rng.range(1, 20);
            self.at(d, Ev::PStop { tries: tries + 1 });
            return Ok(());
        }
        // Dropped: the application goes on.
        self.ps.stopping = false;
        self.resume_workload();
        Ok(())
    }

    /// The clean stop, the restart and checker 15.
    fn p_stop_now(&mut self) -> Result<(), String> {
        self.report.p_clean_stops += 1;
        self.account_primary_stats();
        if self.up {
            self.drop_connection()?;
        }
        #[cfg(test)]
        let skip = self.sabotage.p_clean_stop_skips_pages;
        #[cfg(not(test))]
        let skip = false;
        // The daemon's rule (`Node::clean_stop_plan`): after a failed metadata write the
        // metadata stays unclean and only the data is flushed; the restart then applies
        // the activity log and records a crash, as after a power loss (checker 6, not 15).
        let clean = self.pn.clean_stop_plan().is_ok();
        if clean {
            self.clean_stop(true, skip)?;
        } else {
            self.report.p_unclean_stops += 1;
            self.persist(true, &[Durable::FlushData])?;
        }
        let at_stop = self.pn.primary.out_of_sync().clone();
        // `mark_clean` clears the Primary indicator, so the attach sees no crash; a crash
        // flag not yet repaired stays (`MDF_CRASHED_PRIMARY` is not touched).
        let crashed_before = self.pn.crashed_primary || !clean;
        // The old node's IO is gone with it (there is none: it was idle).
        self.inc += 1;
        self.primary_crashed();
        self.admitted = 0;
        self.retired = 0;
        let a = self
            .meta_dev
            .attach(SECTORS as u64, self.params.extent_shift)?;
        if clean && !a.hot.is_empty() {
            return Err(format!(
                "checker 15: a clean stop left {} hot extents to apply",
                a.hot.len()
            ));
        }
        let differs = (0..at_stop.blocks()).find(|&b| at_stop.is_set(b) != a.bitmap.is_set(b));
        if let Some(b) = differs.filter(|_| clean) {
            return Err(format!(
                "checker 15: block {b} is {} in the bitmap at the clean stop and {} in the \
                 restarted one",
                at_stop.is_set(b),
                a.bitmap.is_set(b)
            ));
        }
        let primary = self.restarted_core(a.bitmap)?;
        self.primary_restarted(primary, crashed_before)?;
        self.check6 = Some(a.on_disk);
        Ok(())
    }
}
