//! The Primary's disk fails (checker 18): `on-io-error detach`, as the daemon does it
//! (the node's `Event::WriteFailed` → [`crate::replica::Node::local_write_failed`] and
//! its plan, `replica/disk.rs`).
//!
//! On about one seed in eight, at the end of the run once in sync (checkers 1 … 8
//! passed, after the online verify and the SyncTarget Primary's reads, before the
//! Primary's death), the Primary's next local write fails. Its node takes the disk out
//! of service: `Diskless`, its core serves through the peer
//! ([`crate::request::Primary::detach_local`]), and the failure record ("not
//! consistent", "full sync from the peer", [`crate::replica::Node::failure_record`]) is
//! made durable before the write completes (at once in the model, whose metadata device
//! has no superblock); the Secondary learns the disk state (its `P_STATE`,
//! instantaneous here). The application then writes [`WRITES`] more requests, which reach only the
//! Secondary, and reads [`READS`] ranges, half of them over blocks written since the
//! failure; the node decides where each read goes ([`crate::replica::Node::reads_from_peer`]),
//! a peer read is `P_DATA_REQUEST` / `P_DATA_REPLY` through the codec, answered from the
//! Secondary's disk. One connection drop comes at a random moment after the failure (the
//! writes in flight fail; the Secondary applies what it received; the reconnect runs no sync
//! handshake with a Diskless side and is Connected at once); no other fault runs
//! meanwhile (no crash, no disk failure). Then the Primary dies as on every seed and the
//! failover promotes the Secondary.
//!
//! Checked (checker 18): the failure takes the disk out of service once (Diskless), the
//! Diskless Primary's writes complete and
//! (protocol C) are on the Secondary's disk when they do, every read returns the
//! reference image (the last write completed per sector), and the Secondary marks out of
//! sync every block it holds from a write issued after it learned of the failure (the
//! Primary's disk lacks it: DRBD's `receive_Data`, [`crate::replica::Node::step`]); then
//! checker 9 finds every acknowledged write on the promoted Secondary.
//!
//! Before this scenario the simulator's Primary kept using a disk whose write had failed
//! (it marked the block and went on), which neither of the daemon's `on-io-error`
//! policies does (it still does outside the scenario). Its first run found a lost write:
//! a Diskless Primary under protocol B completed a write at `P_RECV_ACK`, the connection
//! dropped while the Secondary held it, and the only copy was gone; such a write now
//! waits for `P_WRITE_ACK` (`request/primary.rs`).

use super::rng::Rng;
use super::st_reads::read_range;
use super::{sector_is, Ev, Sim, SECTORS, SECTORS_PER_BLOCK, UNKNOWN};
use crate::replica::{Action, Io, LocalWrite};
use crate::request::SECTOR;
use crate::state::{DiskState, Role};
use crate::wire::Packet;
use std::collections::BTreeSet;

/// Requests the application issues after the failure.
const WRITES: u32 = 24;

/// Reads of the Diskless Primary's application.
const READS: u32 = 16;

/// The scenario's state for one seed (a stream of its own).
#[derive(Debug)]
pub(super) struct PDetach {
    rng: Rng,
    /// The next local write of the Primary fails.
    pub(super) fail_next: bool,
    /// Writes sent to the Secondary that it had not received when the connection
    /// dropped (lost with the connection).
    pub(super) unlanded: BTreeSet<u64>,
    /// The first request id issued after the Secondary learned that the Primary is
    /// Diskless.
    told_from: u64,
}

/// A seed's draw: `Some` if it runs the scenario.
pub(super) fn drawn(seed: u64) -> Option<PDetach> {
    let (rng, happens) = Rng::scenario(seed, 0x7064_6574_6163, 125_000);
    happens.then_some(PDetach {
        rng,
        fail_next: false,
        unlanded: BTreeSet::new(),
        told_from: u64::MAX,
    })
}

impl Sim {
    /// The failure, the writes and the reads (see the module docs). `true`: the
    /// Primary's node died meanwhile (a failover drawn for the run's middle came due).
    pub(super) fn p_detach_at_end(&mut self, mut pd: PDetach) -> Result<bool, String> {
        if self.pn.disk != DiskState::UpToDate || self.pn.primary.stats().meta_failed {
            // A metadata write failed earlier: the disk is out of use already.
            return Ok(false);
        }
        // No crash of the Diskless Primary (its restart would attach the failed disk) and
        // no other disk failure (a Secondary that failed too would leave no UpToDate
        // data); one connection drop while the writes run (those in flight fail, the
        // Secondary applies what it received, the reconnect is Connected at once).
        self.crashes_left.clear();
        self.params.fail_ppm = [0; 4];
        self.report.p_detaches += 1;
        pd.fail_next = true;
        self.pd = Some(pd);
        let first = self.ops.len() as u64;
        self.max_ops += WRITES;
        self.at(0, Ev::Workload);
        self.run_events()?;
        if self.fo.dead {
            return Ok(true);
        }
        let Some(mut pd) = self.pd.take() else {
            return Err("checker 18: the scenario's state went away".into());
        };
        if self.pn.disk != DiskState::Diskless {
            return Err(format!(
                "checker 18: the failed write left the Primary's disk {}",
                self.pn.disk
            ));
        }
        if self.outstanding != 0 || !self.up {
            return Err("checker 18: the Diskless Primary's writes did not all end".into());
        }
        self.forget_failed_disk_only(&pd.unlanded);
        self.diskless_writes_marked(pd.told_from)?;
        let written: Vec<u64> = self.ops[usize::try_from(first).unwrap_or(0)..]
            .iter()
            .filter_map(|op| match op.kind {
                Io::Write { sector, .. } => Some(sector),
                Io::Flush => None,
            })
            .collect();
        for _ in 0..READS {
            self.diskless_read(&mut pd.rng, &written)?;
        }
        Ok(false)
    }

    /// A write completed on the Primary's disk before it failed and still in the network
    /// when the connection dropped (`unlanded`: a protocol A or B write acknowledged
    /// early, or one whose local part completed it as the connection went)
    /// lived only on the failed disk — a double failure, lost as in DRBD: its sectors'
    /// outcome is unknown from now on (for the reads and for checker 9). A write of the
    /// Diskless Primary is never among them: it completes only once it landed.
    fn forget_failed_disk_only(&mut self, unlanded: &BTreeSet<u64>) {
        for s in 0..SECTORS {
            if unlanded.contains(&self.ref_ver[s]) {
                self.ref_ver[s] = UNKNOWN;
                self.report.p_diskless_lost_sectors += 1;
            }
        }
    }

    /// The connection dropped while the scenario runs: the writes not landed on the
    /// Secondary are remembered.
    pub(super) fn p_detach_connection_dropped(&mut self) {
        if let Some(pd) = self.pd.as_mut() {
            pd.unlanded.extend(self.fo.in_net.iter().copied());
        }
    }

    /// A local write of the Primary failed while the scenario runs (`false`: not in
    /// the scenario, nothing done): through the node ([`Event::WriteFailed`],
    /// `on-io-error detach`), the failure record durable before the write completes,
    /// and the Secondary told the disk state.
    pub(super) fn p_disk_failed(&mut self, w: &LocalWrite) -> Result<bool, String> {
        if self.pd.is_none() {
            return Ok(false);
        }
        let detached = self.pn.disk == DiskState::Diskless;
        let (failure, out) = self.node_write_failed(true, w, true)?;
        let Some(pd) = self.pd.as_mut() else {
            return Ok(false);
        };
        match (detached, failure) {
            // A later failure (a write submitted before the first ended) changes nothing
            // more than its bit; it completes once the record is durable.
            (true, None) => {}
            (false, Some(_)) => {}
            (true, Some(_)) => return Err("checker 18: the disk left service twice".into()),
            (false, None) => {
                return Err("checker 18: the first failure left the disk in service".into())
            }
        }
        if failure.is_some() {
            // The connection drop, while the Diskless Primary's writes run.
            let d = pd.rng.range(1, 200);
            let gen = self.gen;
            self.at(d, Ev::Drop { gen });
        }
        // The Secondary learns the disk state at once in the model.
        self.actions.extend(out.into_iter().filter(|a| {
            !matches!(
                a,
                Action::Send {
                    pkt: Packet::State(_),
                    ..
                }
            )
        }));
        if failure.is_some() {
            self.sn.peer_reported(Role::Primary, self.pn.disk);
            if let Some(pd) = self.pd.as_mut() {
                pd.told_from = self.ops.len() as u64 + 1;
            }
        }
        Ok(true)
    }

    /// Every block the Secondary holds from a request issued since it learned that the
    /// Primary is Diskless (id ≥ `told_from`) is out of sync there (checker 18).
    fn diskless_writes_marked(&self, told_from: u64) -> Result<(), String> {
        let bm = self.sn.primary.out_of_sync();
        for (s, &v) in self.sdisk.cache_ver.iter().enumerate() {
            let block = (s / SECTORS_PER_BLOCK) as u64;
            if v >= told_from && v != UNKNOWN && !bm.is_set(block) {
                return Err(format!(
                    "checker 18: the Secondary holds write {v} of the Diskless Primary at \
                     sector {s} (block {block}) and does not mark it out of sync"
                ));
            }
        }
        Ok(())
    }

    /// The next write of the Primary fails (drawn per write as always; the scenario
    /// forces its first).
    pub(super) fn p_write_fails(&mut self) -> bool {
        let drawn = self.rng.chance(self.params.fail_ppm[0]);
        drawn
            | self
                .pd
                .as_mut()
                .is_some_and(|pd| std::mem::take(&mut pd.fail_next))
    }

    /// One read of the Diskless Primary's application (checker 18).
    fn diskless_read(&mut self, rng: &mut Rng, written: &[u64]) -> Result<(), String> {
        let (sector, len) = read_range(rng, written)?;
        let sectors = len / SECTOR;
        self.report.p_diskless_reads += 1;
        let got = if self.pn.reads_from_peer(sector, len) {
            self.peer_read(sector, len, false)?
        } else {
            let at = usize::try_from(sector).map_err(|e| e.to_string())? * SECTOR as usize;
            self.pdisk.cache[at..at + len as usize].to_vec()
        };
        for (i, bytes) in got.chunks(SECTOR as usize).enumerate() {
            let s = usize::try_from(sector).map_err(|e| e.to_string())? + i;
            let v = self.ref_ver[s];
            if v == UNKNOWN {
                continue;
            }

            if !sector_is(bytes, v, s, v == 0 || !self.write_has_data(v)) {
                return Err(format!(
                    "checker 18: a read of sectors {sector}+{sectors} on the Diskless Primary \
                     returned other bytes than write {v} at sector {s} (block {}; the \
                     Secondary's disk holds version {}, durable {})",
                    s / SECTORS_PER_BLOCK,
                    self.sdisk.cache_ver[s],
                    self.sdisk.durable_ver[s]
                ));
            }
        }
        Ok(())
    }
}
