//! The switchover (checker 11): on about half of the seeds, once the first workload is
//! done and the nodes are in sync (checkers 1 … 8 passed), the operator moves the
//! Primary role to the other node, as with DRBD: `secondary` on the Primary, then
//! `primary` on the Secondary while connected. Both run the daemon's sequences
//! (`replica/roles.rs`), every packet through the real codec:
//!
//! 1. the Primary's demotion (`Admin::Demote` through its node, `sim/roles.rs`: the
//!    role at once, the core lets go of the peer), its data disk flushed, its dirty
//!    bitmap pages written to its metadata device, its demoted UUIDs; its `P_STATE`
//!    tells the Secondary;
//! 2. the Secondary's `primary` (`Admin::Promote`): its `P_STATE_CHG_REQ`, decided by
//!    the old Primary's node (`Event::StateRequest`); the grant back
//!    (`Event::StateReply`), its promotion's plan (durable at once in the model) and
//!    the `P_STATE` of its actions, which the old Primary records.
//!
//! Then the nodes trade places in the model: each keeps its `Node`, its data disk and
//! its metadata device, and the simulator's "Primary's node" is now the other one. A
//! second workload of half the size runs with the roles reversed — its writes replicate
//! from the old Secondary's node to the old Primary's — with the faults of the first
//! (connection drops, Secondary disk failures, a crash of the new Primary on about half
//! of these seeds: its own activity log on its own metadata device, resyncs the other
//! way).
//!
//! Checked: the demotion and the promotion are allowed and taken, nothing but a
//! `P_STATE` leaves either node, both nodes then hold the same generation (a connected
//! promotion starts none) and each knows the other's role; at the end of the second
//! workload every checker holds again, and the failover that ends every seed promotes
//! the old Primary's node.

use super::rng::{mix, Rng};
use super::Sim;
use crate::replica::Action;
#[cfg(test)]
use crate::replica::Durable;
use crate::state::{DiskState, Role};
use crate::wire::{Packet, StateBits};

/// The switchover's draw for one seed (a stream of its own, so the other parameters
/// stay what they were).
#[derive(Debug)]
pub(super) struct Switch {
    rng: Rng,
    /// Requests of the second workload; `None`: no switchover on this seed (or done).
    pub(super) ops: Option<u32>,
    /// The second workload has a crash of the new Primary after this many of them.
    crash_after: Option<u32>,
}

impl Switch {
    pub(super) fn new(seed: u64, max_ops: u32) -> Self {
        let mut rng = Rng::new(mix(seed ^ 0x7377_6974_6368));
        let ops = rng.chance(500_000).then_some((max_ops / 2).max(1));
        let crash_after = ops
            .filter(|_| rng.chance(500_000))
            .map(|n| u32::try_from(rng.range(1, u64::from(n))).unwrap_or(1));
        Switch {
            rng,
            ops,
            crash_after,
        }
    }
}

impl Sim {
    /// The switchover and the start of the second workload (see the module docs), on a
    /// quiescent, connected, in-sync pair.
    pub(super) fn switchover(&mut self, ops: u32) -> Result<(), String> {
        self.report.switchovers += 1;
        #[cfg(test)]
        if self.trace {
            eprintln!("t={} switchover, then {ops} requests", self.now);
        }
        // 1. `secondary` on the Primary; 2. `primary` on the Secondary.
        self.demote(true)?;
        let mut rng = std::mem::replace(&mut self.sw.rng, Rng::new(0));
        let promoted = self.promote_connected(false, &mut rng);
        self.sw.rng = rng;
        promoted?;
        if self.pn.uuids.current & !1 != self.sn.uuids.current & !1
            || self.pn.uuids.bitmap != self.sn.uuids.bitmap
        {
            return Err(format!(
                "after the switchover the nodes hold different generations: {} and {}",
                self.pn.uuids, self.sn.uuids
            ));
        }
        self.trade_places();
        // The second workload, with the faults of the first.
        self.max_ops += ops;
        if let Some(k) = self.sw.crash_after {
            self.crashes_left.push_back(self.issued + k);
        }
        self.at(0, super::Ev::Workload);
        if let Some(every) = self.params.fault_every {
            let d = self.rng.range(1, 2 * every);
            self.at(d, super::Ev::Fault);
        }
        Ok(())
    }

    /// `secondary` on a node (`primary_node`: the simulator's Primary's node) while
    /// connected and idle: the role at once (the core lets go of the peer), its data disk
    /// flushed, its dirty bitmap pages written to its metadata device, its demoted UUIDs;
    /// its `P_STATE` tells the other node.
    pub(super) fn demote(&mut self, primary_node: bool) -> Result<(), String> {
        let node = if primary_node {
            &mut self.pn
        } else {
            &mut self.sn
        };
        #[allow(unused_mut)]
        let (mut plan, then) = super::roles::demote(node, &mut self.actions)?;
        if primary_node {
            self.pump_primary()?;
        } else {
            self.pump_secondary()?;
        }
        // The plan flushes the data disk before the metadata says "not Primary" (DRBD's
        // metadata writes carry a preflush): the writes it completed and no flush made
        // durable are the new Primary's to promise after the switch.
        #[cfg(test)]
        if self.sabotage.demotion_skips_flush {
            plan.retain(|s| *s != Durable::FlushData);
        }
        let ok = self.persist(primary_node, &plan)?;
        let node = if primary_node {
            &mut self.pn
        } else {
            &mut self.sn
        };
        super::roles::demoted(node, then, ok, &mut self.actions)?;
        let states = self.states_sent()?;
        self.receive_states(&states, !primary_node)
    }

    /// `primary` on a node while connected: the other node is asked first
    /// (`P_STATE_CHG_REQ`, decided by its `peer_request`); on the grant, the promotion
    /// (the metadata durable at once in the model) and its `P_STATE`, which the other
    /// node records.
    pub(super) fn promote_connected(
        &mut self,
        primary_node: bool,
        rng: &mut Rng,
    ) -> Result<(), String> {
        let ctx = self.rs.ctx;
        let (node, other) = if primary_node {
            (&mut self.pn, &mut self.sn)
        } else {
            (&mut self.sn, &mut self.pn)
        };
        // One draw: the pair is past its first generation.
        let r = rng.next_u64();
        super::roles::promote(
            node,
            Some((other, &ctx)),
            [r, r],
            |_, _| Ok(true),
            &mut self.actions,
        )
        .map_err(|e| format!("the promotion: {e}"))?;
        let states = self.states_sent()?;
        self.receive_states(&states, !primary_node)
    }

    /// The `P_STATE` words among the actions drained into `self.actions` (anything else
    /// is an error: a role change sends nothing more while in sync and idle).
    fn states_sent(&mut self) -> Result<Vec<u32>, String> {
        let mut words = Vec::new();
        for a in std::mem::take(&mut self.actions) {
            match a {
                Action::Send { pkt, .. } => match self.wire(&pkt, &[])? {
                    Packet::State(w) => words.push(w),
                    other => return Err(format!("a role change sent {other:?}")),
                },
                other => return Err(format!("a role change asked for {other:?}")),
            }
        }
        if words.len() != 1 {
            return Err(format!("a role change sent {} P_STATE", words.len()));
        }
        Ok(words)
    }

    /// The peer receives `P_STATE` (`to_primary_node`: the Primary's node receives it).
    fn receive_states(&mut self, words: &[u32], to_primary_node: bool) -> Result<(), String> {
        let (to, from) = if to_primary_node {
            (&mut self.pn, &self.sn)
        } else {
            (&mut self.sn, &self.pn)
        };
        for &w in words {
            let s = StateBits::unpack(w);
            let role = Role::from_u32(u32::from(s.role)).ok_or("P_STATE with a bad role")?;
            let disk = DiskState::from_u32(u32::from(s.disk)).ok_or("P_STATE with a bad disk")?;
            if role != from.role || disk != from.disk {
                return Err(format!(
                    "P_STATE says {role}/{disk}, the node is {}/{}",
                    from.role, from.disk
                ));
            }
            to.peer_reported(role, disk);
        }
        Ok(())
    }

    /// The two nodes trade places: the simulator's Primary's node is now the other one,
    /// with its disk and its metadata device; the bookkeeping of the first workload's
    /// roles (all of it idle or empty at quiescence) starts afresh.
    fn trade_places(&mut self) {
        self.account_primary_stats();
        self.account_receiver_stats();
        // Both disks hold the reference image (checkers 1 and 7 passed): each sector is
        // labelled with the write whose bytes it holds.
        for (s, &v) in self.ref_ver.iter().enumerate() {
            if v == super::UNKNOWN {
                // No reference (a failed write, a request lost in a crash): the
                // Secondary's sector takes the Primary's label where it holds the same
                // bytes (two zero writes look alike).
                let (p, v) = (self.pdisk.cache_sector(s).to_vec(), self.pdisk.cache_ver[s]);
                self.sdisk.relabel(s, v, |b| b == p.as_slice());
                continue;
            }
            let zero = v == 0 || !self.write_has_data(v);
            for disk in [&mut self.pdisk, &mut self.sdisk] {
                disk.relabel(s, v, |b| super::sector_is(b, v, s, zero));
            }
        }
        std::mem::swap(&mut self.pn, &mut self.sn);
        std::mem::swap(&mut self.pdisk, &mut self.sdisk);
        std::mem::swap(&mut self.meta_dev, &mut self.s_meta_dev);
        self.rs.trade_places();
        self.fo.trade_places();
    }
}
