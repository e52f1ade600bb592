//! The operator's `invalidate` of the Secondary (checker 13), through the node's own
//! sequence (`replica/admin.rs`).
//!
//! On about one seed in eight, a random time (1 … 2,000 ticks) into the run, the
//! operator finds the Secondary's disk damaged behind tandem's back (a few blocks
//! overwritten with garbage, on the platter: cache and durable) and invalidates it:
//! `Node::begin_invalidate` — refused while the node is not connected or a run goes,
//! tried again 20 … 200 ticks later, at most [`MAX_TRIES`] times — marks every block;
//! then the daemon's steps: every bitmap page written to the Secondary's metadata device,
//! "inconsistent" (the model keeps the disk state in the node: durable when assigned),
//! and `Node::invalidated`, whose `DropConnection` renews the connection. The
//! handshake makes the Secondary the SyncTarget of a full resync.
//!
//! Checked (checker 13): when the connection is dropped, the Secondary's bitmap on its
//! metadata device holds every block (a power loss before the resync must still resync
//! everything), and the first target run after it starts with every block to fetch.
//! Checker 7 at the end then finds the damaged blocks repaired: a resync that left one
//! out leaves the disks different.

use super::disk::Disk;
use super::rng::Rng;
use super::{Ev, Sim, SECTORS, SECTORS_PER_BLOCK};
use crate::replica::{Admin, Durable, Event, Outcome, Then};
use crate::request::SECTOR;
use crate::state::{DiskState, Role};

/// Attempts to find the Secondary connected with no run going.
const MAX_TRIES: u32 = 20;

/// The volume's 4 KiB blocks.
const BLOCKS: u64 = (SECTORS / SECTORS_PER_BLOCK) as u64;

/// Blocks the operator finds damaged.
pub(super) const DAMAGED: usize = 4;

/// The invalidate's draw for one seed (a stream of its own).
#[derive(Debug)]
pub(super) struct Invalidate {
    rng: Rng,
    /// Scheduled at the start of the run.
    due: bool,
    /// Invalidated; the full resync's target has not started yet.
    pub(super) awaiting_target: bool,
}

impl Invalidate {
    pub(super) fn new(seed: u64) -> Self {
        let (rng, due) = Rng::scenario(seed, 0x696e_7661_6c69, 125_000);
        Invalidate {
            rng,
            due,
            awaiting_target: false,
        }
    }
}

/// `n` blocks of a disk drawn and overwritten behind tandem's back, on the platter (cache
/// and durable); returns them, sorted, each once.
pub(super) fn damage(disk: &mut Disk, rng: &mut Rng, n: usize) -> Vec<u64> {
    let block = SECTORS_PER_BLOCK * SECTOR as usize;
    let mut damaged: Vec<u64> = (0..n).map(|_| rng.range(0, BLOCKS - 1)).collect();
    damaged.sort_unstable();
    damaged.dedup();
    for &b in &damaged {
        let b = usize::try_from(b).unwrap_or(0);
        let r = b * block..(b + 1) * block;
        for (c, d) in disk.cache[r.clone()].iter_mut().zip(&mut disk.durable[r]) {
            *c ^= 0xA5;
            *d = *c;
        }
    }
    damaged
}

impl Sim {
    /// At the start of the run: the invalidate, if this seed has one.
    pub(super) fn maybe_schedule_invalidate(&mut self) {
        if std::mem::take(&mut self.inv.due) {
            let d = self.inv.rng.range(1, 2000);
            self.at(d, Ev::SInvalidate { tries: 0 });
        }
    }

    /// The operator's `invalidate` (see the module docs).
    pub(super) fn s_invalidate(&mut self, tries: u32) -> Result<(), String> {
        let eligible = self.up
            && !self.fo.dead
            && !self.primary_down
            && self.check6.is_none()
            && self.sn.role == Role::Secondary
            && self.sn.disk == DiskState::UpToDate
            && !self.sn.runs.finishing();
        if !eligible || !self.begin_s_invalidate()? {
            if tries < MAX_TRIES && !self.workload_done() {
                let d = self.inv.rng.range(20, 200);
                let tries = tries + 1;
                self.at(d, Ev::SInvalidate { tries });
            }
            return Ok(());
        };
        damage(&mut self.sdisk, &mut self.inv.rng, DAMAGED);
        // The plan (`Action::Persist`), then what follows it (`s_persisted`).
        self.pump_secondary()
    }

    /// The operator's `invalidate` on the Secondary's node ([`Admin::Invalidate`]):
    /// `false` if refused; otherwise its plan waits among the actions.
    pub(super) fn begin_s_invalidate(&mut self) -> Result<bool, String> {
        let done = self.operator(false, Admin::Invalidate)?;
        Ok(!matches!(done, Outcome::Refused(_)))
    }

    /// The Secondary's node asked for a plan ([`crate::replica::Action::Persist`]): performed
    /// as the daemon does, then [`Event::Persisted`] and what follows, at once. After an
    /// invalidate (every block marked): every bitmap page written (checker 13 reads them
    /// back), then "inconsistent"; then `Node::invalidated`, whose `DropConnection`
    /// renews the connection.
    pub(super) fn s_persisted(&mut self, plan: &[Durable], then: Then) -> Result<(), String> {
        let ok = self.persist(false, plan)?;
        if then == Then::Invalidated {
            self.check13_bitmap_on_disk()?;
        }
        self.node_step(false, Event::Persisted { then, ok })?;
        self.perform(false)
    }

    /// Checker 13 once an invalidate's plan is durable: the Secondary's bitmap on its
    /// metadata device holds every block.
    fn check13_bitmap_on_disk(&mut self) -> Result<(), String> {
        self.report.invalidates += 1;
        let on_disk = self.s_meta_dev.bitmap(SECTORS as u64)?;
        if on_disk.count() != on_disk.blocks() {
            return Err(format!(
                "checker 13: invalidated, but the Secondary's bitmap on disk holds {} of {} \
                 blocks",
                on_disk.count(),
                on_disk.blocks()
            ));
        }
        self.inv.awaiting_target = true;
        Ok(())
    }

    /// Checker 13 at the start of a target run: the first one after an invalidate
    /// fetches every block.
    pub(super) fn check13_target_start(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.inv.awaiting_target) {
            return Ok(());
        }
        let bm = self.sn.primary.out_of_sync();
        if bm.count() != bm.blocks() {
            return Err(format!(
                "checker 13: the resync after an invalidate fetches {} of {} blocks",
                bm.count(),
                bm.blocks()
            ));
        }
        Ok(())
    }
}
