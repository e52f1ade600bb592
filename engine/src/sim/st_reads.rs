//! Reads of a SyncTarget Primary (checker 17), through the node's rule
//! ([`crate::replica::Node::reads_from_peer`], the daemon's read path).
//!
//! On about one seed in eight, at the end of the run once in sync (checkers 1 … 8
//! passed, after the online verify, before the Primary's death), the operator finds
//! [`DAMAGED`] of the Secondary's blocks damaged behind tandem's back and invalidates it
//! (`invalidate.rs`: every block marked, the pages written, the connection dropped). When
//! the full resync's target starts, the roles trade places as in DRBD's switchover
//! (`switchover.rs`'s steps): `secondary` on the Primary, then `primary` on the
//! SyncTarget, which may serve as Primary while its source is UpToDate (`roles.rs`). Its
//! application then reads [`READS`] ranges at random moments while the resync runs,
//! half of them over a damaged block. The node decides where each read goes: a block
//! still to be fetched sends `P_DATA_REQUEST` to the peer, whose `P_DATA_REPLY` (both
//! through the codec) carries what its disk holds; otherwise its own disk answers (its
//! cache: what a read returns). After the last read the roles trade back (`secondary`
//! on the SyncTarget, `primary` on the SyncSource) and the resync ends as usual.
//!
//! No application write and no fault runs meanwhile, so the peer's disk (the
//! SyncSource's) holds the reference image throughout (checker 1 passed).
//!
//! Checked (checker 17): every read returns the SyncSource's bytes — a read of a block
//! not yet resynced that the node answered from its own (damaged) disk fails it; the
//! roles trade and trade back; then checker 7 finds the damaged blocks repaired.

use super::invalidate::damage;
use super::rng::Rng;
use super::{Ev, Sim, SECTORS, SECTORS_PER_BLOCK};
use crate::request::SECTOR;
use crate::state::Role;
use crate::wire::{BlockReq, Command, DataHeader, Packet};

/// Blocks the operator finds damaged (of 256).
const DAMAGED: usize = 32;

/// Reads of the SyncTarget Primary's application.
const READS: u32 = 16;

/// Longest read, in sectors (64 KiB).
const MAX_READ_SECTORS: u64 = 128;

/// The scenario's state for one seed (a stream of its own).
#[derive(Debug)]
pub(super) struct StReads {
    rng: Rng,
    /// The first sectors of the damaged blocks, once damaged.
    damaged: Vec<u64>,
    /// Invalidated; the roles trade when the full resync's target starts.
    awaiting_target: bool,
    /// Reads not yet done.
    left: u32,
}

/// A seed's draw: `Some` if it runs the scenario.
pub(super) fn drawn(seed: u64) -> Option<StReads> {
    let (rng, happens) = Rng::scenario(seed, 0x7374_7265_6164, 125_000);
    happens.then_some(StReads {
        rng,
        damaged: Vec::new(),
        awaiting_target: false,
        left: 0,
    })
}

/// An application read of up to [`MAX_READ_SECTORS`]: on half of the draws over one of
/// the sectors `near` (ending at or after it), else anywhere. `(first sector, bytes)`.
pub(super) fn read_range(rng: &mut Rng, near: &[u64]) -> Result<(u64, u32), String> {
    let sectors = rng.range(1, MAX_READ_SECTORS);
    let sector = match near.len() {
        n if n > 0 && rng.chance(500_000) => {
            let i = usize::try_from(rng.below(n as u64)).unwrap_or(0);
            let s = near.get(i).copied().unwrap_or(0);
            s.saturating_sub(rng.below(sectors))
        }
        _ => rng.below(SECTORS as u64),
    };
    let len = u32::try_from(sectors).map_err(|e| e.to_string())? * SECTOR;
    Ok((sector.min(SECTORS as u64 - sectors), len))
}

impl Sim {
    /// The damage, the invalidate, the reads while the resync runs (see the module
    /// docs), then the run to quiescence; checker 7 follows in the caller.
    pub(super) fn st_reads_at_end(&mut self, mut st: StReads) -> Result<(), String> {
        self.report.st_primaries += 1;
        st.damaged = damage(&mut self.sdisk, &mut st.rng, DAMAGED)
            .into_iter()
            .map(|b| b * SECTORS_PER_BLOCK as u64)
            .collect();
        if !self.begin_s_invalidate()? {
            return Err("checker 17: invalidate refused".into());
        }
        st.awaiting_target = true;
        self.st = Some(st);
        self.pump_secondary()?;
        if self.until_quiescent()? {
            return Err("checker 17: the Primary died during the reads".into());
        }
        match &self.st {
            Some(st) if st.awaiting_target || st.left > 0 => {
                return Err(format!(
                    "checker 17: the reads did not run (target started: {}, {} left)",
                    !st.awaiting_target, st.left
                ))
            }
            _ => {}
        }
        if self.pn.role != Role::Primary || self.sn.role != Role::Secondary {
            return Err("checker 17: the roles did not trade back".into());
        }
        self.st = None;
        Ok(())
    }

    /// At the start of a target run: the first one after the scenario's invalidate
    /// makes the SyncTarget Primary and schedules its reads.
    pub(super) fn st_target_start(&mut self) -> Result<(), String> {
        let Some(st) = self.st.as_mut().filter(|st| st.awaiting_target) else {
            return Ok(());
        };
        st.awaiting_target = false;
        st.left = READS;
        let mut at = 0;
        let delays: Vec<u64> = (0..READS)
            .map(|_| {
                at += st.rng.range(0, 40);
                at
            })
            .collect();
        for d in delays {
            self.at(d, Ev::StRead);
        }
        self.demote(true)?;
        let mut rng = Rng::new(0);
        self.promote_connected(false, &mut rng)
            .map_err(|e| format!("checker 17: the SyncTarget's promotion: {e}"))
    }

    /// One read of the SyncTarget Primary's application (checker 17); after the last one
    /// the roles trade back.
    pub(super) fn st_read(&mut self) -> Result<(), String> {
        let Some(st) = self.st.as_mut() else {
            return Err("a SyncTarget Primary's read outside its scenario".into());
        };
        let (sector, len) = read_range(&mut st.rng, &st.damaged)?;
        let sectors = u64::from(len / SECTOR);
        st.left -= 1;
        let last = st.left == 0;
        if self.sn.role != Role::Primary || !self.up {
            return Err("checker 17: the SyncTarget is no Primary at its read".into());
        }
        let at = usize::try_from(sector).map_err(|e| e.to_string())? * SECTOR as usize;
        let range = at..at + len as usize;
        let got = if self.sn.reads_from_peer(sector, len) {
            self.report.st_remote_reads += 1;
            self.peer_read(sector, len, true)?
        } else {
            self.report.st_local_reads += 1;
            self.sdisk.cache[range.clone()].to_vec()
        };
        let want = &self.pdisk.cache[range];
        if let Some(bad) = (0..got.len()).find(|&i| got[i] != want[i]) {
            let s = (at + bad) / SECTOR as usize;
            let block = (s / SECTORS_PER_BLOCK) as u64;
            return Err(format!(
                "checker 17: a read of sectors {sector}+{sectors} on the SyncTarget Primary \
                 returned other bytes than its source's at sector {s} (block {block}, out of \
                 sync: {})",
                self.sn.primary.out_of_sync().is_set(block)
            ));
        }
        if last {
            self.demote(false)?;
            let mut rng = Rng::new(0);
            self.promote_connected(true, &mut rng)
                .map_err(|e| format!("checker 17: the promotion back: {e}"))?;
        }
        Ok(())
    }

    /// A read of the peer (`P_DATA_REQUEST`), answered from its disk (`P_DATA_REPLY`),
    /// both through the codec; `from_primary`: the Primary's node answers (the
    /// SyncSource here), else the Secondary's (`p_detach.rs`).
    pub(super) fn peer_read(
        &mut self,
        sector: u64,
        len: u32,
        from_primary: bool,
    ) -> Result<Vec<u8>, String> {
        let req = Packet::BlockReq {
            cmd: Command::P_DATA_REQUEST,
            req: BlockReq {
                sector,
                block_id: sector,
                blksize: len,
                pad: 0,
            },
            digest: Vec::new(),
        };
        let Packet::BlockReq { req, .. } = self.wire(&req, &[])? else {
            return Err("the codec changed a P_DATA_REQUEST".into());
        };
        let at = usize::try_from(req.sector).map_err(|e| e.to_string())? * SECTOR as usize;
        let disk = if from_primary {
            &self.pdisk
        } else {
            &self.sdisk
        };
        let data = disk.cache[at..at + req.blksize as usize].to_vec();
        let reply = Packet::Data {
            cmd: Command::P_DATA_REPLY,
            head: DataHeader {
                sector: req.sector,
                block_id: req.block_id,
                seq_num: 0,
                dp_flags: 0,
            },
            digest: Vec::new(),
            data_len: req.blksize,
        };
        match self.wire(&reply, &data)? {
            Packet::Data { cmd, head, .. }
                if cmd == Command::P_DATA_REPLY && head.sector == sector =>
            {
                Ok(data)
            }
            other => Err(format!("the codec turned a P_DATA_REPLY into {other:?}")),
        }
    }
}
