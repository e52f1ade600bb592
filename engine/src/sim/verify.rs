//! Online verify at the end of a run (checker 16), through the node's own commands and
//! runs (`replica/admin.rs`, `replica/sync.rs`).
//!
//! On about one seed in eight, once the run is in sync (checkers 1 … 8 passed) and
//! before the Primary's death, the operator finds a few of the Secondary's blocks
//! damaged behind tandem's back and runs `verify` on the Primary: `Node::start_verify`
//! (VerifyS); the Secondary's side starts at the first request
//! (`Node::ensure_verify_peer`, VerifyT). The runs' actions are performed in a loop of
//! their own: each packet through the codec to the other node, in order per direction;
//! each digest read from the node's disk at once; a controller step on both nodes every
//! [`TICK_MS`] of model time, at most [`MAX_STEPS`] of them. No application IO and no
//! fault runs meanwhile.
//!
//! Checked (checker 16): verify ends on both nodes, both Connected again; the blocks it
//! reports and marks out of sync on each node are exactly the damaged ones (no fewer,
//! and no more: the rest is identical). Then the operator's disconnect/connect resyncs
//! them, and checker 7 finds the disks identical again.

use super::fresh::through_codec;
use super::invalidate::damage;
use super::rng::Rng;
use super::{Sim, SECTORS};
use crate::replica::{Action, Admin, Event, Outcome, ReadFor, RunRead};
use crate::request::SECTOR;
use crate::resync::{Digest, Inbound, ReadOutcome, VerifyConfig, VerifyProgress};
use crate::state::ConnState;
use crate::wire::{ff, Packet, StateBits, WireCtx};
use std::collections::VecDeque;

/// Model time between two controller steps.
const TICK_MS: u64 = 100;

/// Controller steps before verify must have ended.
const MAX_STEPS: u32 = 1000;

/// A seed's draw (a stream of its own, so that the other seeds run as before).
pub(super) fn drawn(seed: u64) -> Option<Rng> {
    let (rng, happens) = Rng::scenario(seed, 0x7665_7269_6679, 125_000);
    happens.then_some(rng)
}

/// One node's side of the loop.
#[derive(Default)]
struct Side {
    /// Packets on their way to the other node.
    out: VecDeque<Packet>,
    done: Option<VerifyProgress>,
    /// The node's `P_STATE` after its end said Connected (the peer learns it).
    told_connected: bool,
}

impl Sim {
    /// The damage, the verify and checker 16, then the resync that repairs the blocks.
    pub(super) fn verify_at_end(&mut self, mut rng: Rng) -> Result<(), String> {
        self.report.verifies += 1;
        let damaged = damage(&mut self.sdisk, &mut rng, super::invalidate::DAMAGED);
        let ctx = WireCtx::new(101, ff::PRO_FEATURES_84).map_err(|e| e.to_string())?;
        // Both sides' verify as the daemon configures it when a connection comes up: the
        // operator's `verify` on the Primary, the Secondary's side at its first request.
        for n in [&mut self.pn, &mut self.sn] {
            n.peer_started.verify = Some(VerifyConfig::new(SECTORS as u64));
        }
        let (mut p, mut s) = (Side::default(), Side::default());
        let tick = self.tick_input(true);
        let verify = Event::Admin {
            cmd: Admin::Verify { tick },
            reply: 0,
        };
        if let Outcome::Refused(e) = self.verify_step(true, verify, &mut p, &ctx)? {
            return Err(format!("checker 16: verify refused: {e}"));
        }
        for _ in 0..MAX_STEPS {
            self.now += TICK_MS;
            let (tp, ts) = (self.tick_input(true), self.tick_input(false));
            self.verify_step(true, Event::SyncTick(tp), &mut p, &ctx)?;
            self.verify_step(false, Event::SyncTick(ts), &mut s, &ctx)?;
            loop {
                let mut moved = false;
                if let Some(pkt) = p.out.pop_front() {
                    self.verify_inbound(false, &pkt, &mut s, &ctx)?;
                    moved = true;
                }
                if let Some(pkt) = s.out.pop_front() {
                    self.verify_inbound(true, &pkt, &mut p, &ctx)?;
                    moved = true;
                }
                if !moved {
                    break;
                }
            }
            if p.done.is_some() && s.done.is_some() {
                break;
            }
        }
        let (Some(pd), Some(_)) = (&p.done, &s.done) else {
            return Err(format!(
                "checker 16: verify did not end within {MAX_STEPS} steps (VerifyS {}, \
                 VerifyT {})",
                p.done.is_some(),
                s.done.is_some()
            ));
        };
        if !(p.told_connected && s.told_connected) {
            return Err("checker 16: a verify ended without its P_STATE saying Connected".into());
        }
        self.check16(&damaged, pd)?;
        // The operator's disconnect/connect: the Primary starts a generation, the
        // handshake a resync of the marked blocks.
        self.drop_connection()?;
        if self.until_quiescent()? {
            return Err("checker 16: the Primary died during the repair".into());
        }
        self.check_in_sync()
    }

    /// Feeds `ev` to one node (`primary`: the Primary's) through its step and performs
    /// the verify actions that follow, until there are none: packets go to the node's
    /// side of the loop, reads of its disk complete at once.
    fn verify_step(
        &mut self,
        primary: bool,
        ev: Event,
        side: &mut Side,
        ctx: &WireCtx,
    ) -> Result<Outcome, String> {
        let mut actions = Vec::new();
        let (node, disk) = if primary {
            (&mut self.pn, &self.pdisk)
        } else {
            (&mut self.sn, &self.sdisk)
        };
        let outcome = node
            .step(ev, &mut actions)
            .map_err(|e| format!("checker 16: {ev:?} refused: {e}"))?;
        while !actions.is_empty() {
            for a in std::mem::take(&mut actions) {
                match a {
                    Action::SendSync { pkt, .. } => side.out.push_back(through_codec(&pkt, ctx)?),
                    Action::SyncRead(RunRead {
                        run,
                        tag,
                        sector,
                        len,
                        purpose: purpose @ ReadFor::Verify,
                    }) => {
                        let first = usize::try_from(sector * u64::from(SECTOR)).unwrap_or(0);
                        let digest = Digest::of(&disk.cache[first..first + len as usize]);
                        let outcome = ReadOutcome::Ok {
                            all_zero: false,
                            digest: Some(digest),
                        };
                        let done = Event::SyncReadDone {
                            run,
                            tag,
                            purpose,
                            outcome,
                        };
                        node.step(done, &mut actions)
                            .map_err(|e| format!("checker 16: verify digest: {e}"))?;
                    }
                    Action::VerifyFinished { progress, .. } => side.done = Some(progress),
                    // The node's `P_STATE` (VerifyS at the start, Connected after the
                    // end): the model's peer needs none, the checker wants the last.
                    Action::Send {
                        pkt: Packet::State(word),
                        ..
                    } => {
                        let conn = u32::from(StateBits::unpack(word).conn);
                        side.told_connected =
                            side.done.is_some() && conn == ConnState::Connected.as_u32();
                    }
                    other => return Err(format!("checker 16: verify asked for {other:?}")),
                }
            }
        }
        Ok(outcome)
    }

    /// A verify packet arrives at a node (`primary`: the Primary) whose side of the loop
    /// is `side`.
    fn verify_inbound(
        &mut self,
        primary: bool,
        pkt: &Packet,
        side: &mut Side,
        ctx: &WireCtx,
    ) -> Result<(), String> {
        let inbound = Inbound::from_packet(pkt)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("checker 16: {pkt:?} is no verify packet"))?;
        let tick = self.tick_input(primary);
        let ev = Event::SyncPacket { inbound, tick };
        if self.verify_step(primary, ev, side, ctx)? == Outcome::Full {
            return Err("checker 16: VerifyT's queue is full with its reads done".into());
        }
        Ok(())
    }

    /// Checker 16 at the end of verify.
    fn check16(&self, damaged: &[u64], found: &VerifyProgress) -> Result<(), String> {
        for (who, n) in [("primary", &self.pn), ("secondary", &self.sn)] {
            if n.conn != ConnState::Connected {
                return Err(format!(
                    "checker 16: after verify the {who} says {}",
                    n.conn
                ));
            }
            let bm = n.primary.out_of_sync();
            let marked: Vec<u64> = (0..bm.blocks()).filter(|&b| bm.is_set(b)).collect();
            if marked != damaged {
                return Err(format!(
                    "checker 16: verify marked blocks {marked:?} on the {who}, the damaged \
                     ones are {damaged:?}"
                ));
            }
        }
        if found.out_of_sync_blocks != damaged.len() as u64 {
            return Err(format!(
                "checker 16: verify reports {} blocks out of sync, {} were damaged",
                found.out_of_sync_blocks,
                damaged.len()
            ));
        }
        Ok(())
    }
}
