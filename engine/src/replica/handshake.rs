//! The node's side of the connection handshake: what it says of itself
//! ([`Node::hello`], sent in `P_UUIDS` and `P_STATE`) and what the peer's answer makes
//! of the connection ([`Node::agree`]) — DRBD's `drbd_sync_handshake` over this node's
//! state, then what DRBD does with the result before the bitmap exchange:
//!
//! - **The decision.** [`sync_handshake`] on both sides' UUIDs, disks, roles and flags,
//!   with the after-sb policies: Connected, SyncSource or SyncTarget (fully or from the
//!   bitmap), or a refusal (split brain, unrelated data, a Primary that would become
//!   SyncTarget). A Diskless side has nothing to sync: Connected (DRBD runs the sync
//!   handshake only when both nodes have a disk).
//! - **tandem's one refinement.** Rules 20/30 ask for a full sync of a just-created disk.
//!   A just-created disk that is consistent (a backing file `tandem up` created, all
//!   zeroes) facing a node whose bitmap UUID is still the just-created value (it left
//!   that generation by writing without this peer, so every block it wrote since is in
//!   its bitmap) needs only the bitmap, as rule 50 would say.
//! - **UUID corrections** (rules 34, 35, 51 and 71: a `P_SYNC_UUID` or the end of a
//!   resync that one side missed). A correction of this node's UUIDs is applied to
//!   [`Node::uuids`] when the connection is not refused; every outcome that carries one
//!   is a resync, whose first step makes the UUIDs durable
//!   ([`Node::begin_sync_source`] / [`Node::begin_sync_target`]). A correction of the
//!   peer's is kept in [`Node::peer_uuids`], the generation a target completes at its
//!   end ([`Node::start_target`]). Before this module both drivers decided on their
//!   own, and only the simulator applied corrections.
//! - **What follows.** A full sync marks every block before the exchange
//!   ([`Node::exchange_bitmap`]); the run the connection starts and whether a target
//!   compares checksums first ([`Node::sync_role`]).
//! - **Writes during the exchange.** A Primary SyncSource keeps writing while the
//!   bitmaps cross; a block it marks after its snapshot is in neither bitmap the target
//!   holds, and a target resyncs only what it knows. DRBD sends such a block as
//!   `P_OUT_OF_SYNC` while WFBitMapS, before `P_SYNC_UUID`; tandem tells them all at
//!   once ([`Node::source_start`]) at the moment it starts replicating, so that no write falls
//!   between the two (the driver queues them, then `P_SYNC_UUID`, ahead of every
//!   replicated write, under the one lock). Before this, a write in that window stayed
//!   out of sync on a Connected pair with no resync to repair it.
//! - **The connection's start** ([`Up`], [`super::Event::ConnectionUp`]): once the
//!   handshake and the exchange it decided are done, the node learns the connection, the
//!   run starts (a target told of every write on the disk, paused if the operator paused
//!   resync; a source) or the connection is Connected (a crash of this node as Primary
//!   is repaired there: [`super::Action::CrashRepaired`]), this node's `P_STATE` goes
//!   out, and a Primary's core replicates from then on — in both drivers at the same
//!   point: the daemon when its exchange is done, each simulated node when its own is
//!   (the SyncSource at the target's bitmap, the SyncTarget at `P_SYNC_UUID`). A run the
//!   peer's parameters make impossible is the peer's error.
//! - **A changed node.** The peer decides on what this node sent. If this node's UUIDs,
//!   role, disk or flags changed since (a promotion raced the handshake), the two
//!   decisions could differ: [`Node::agree`] refuses, and the driver connects again.
//!
//! Bounds: one call per handshake; the messages are a few hundred bytes.

use super::step::StepError;
use super::{Action, Node};
use crate::request::{OutOfSync, BLOCK_SIZE, SECTOR};
use crate::resync::{SourceConfig, TargetConfig, TickInput};
use crate::state::uuid::{
    sync_handshake, Handshake, HandshakeCtx, HandshakeOutcome, HandshakeSide, SplitBrainPolicy,
    SplitBrainResolution, UuidSide, UUID_JUST_CREATED,
};
use crate::state::{DiskState, Role};
use crate::wire::{BlockDesc, Command, Packet, DRBD_MAX_BIO_SIZE};

/// The run a connection starts after the handshake ([`Node::sync_role`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncRole {
    /// This node sends data.
    Source,
    /// This node receives data; `csums`: it compares checksums first.
    Target { csums: bool },
}

/// What the handshake made of a connection ([`Node::agree`]).
#[derive(Debug, Clone)]
pub(crate) struct Agreement {
    /// What the connection does; `Disconnect` is a refusal ([`Self::refusal`]).
    pub(crate) outcome: HandshakeOutcome,
    /// DRBD's sync handshake (`None`: a side is Diskless and it did not run); its
    /// `outcome` is before tandem's refinement.
    pub(crate) handshake: Option<Handshake>,
    /// Both sides' UUIDs and the rule, for the log.
    why: String,
}

impl Agreement {
    /// Why the connection is refused (`None`: it is not).
    pub(crate) fn refusal(&self) -> Option<String> {
        match self.outcome {
            HandshakeOutcome::Disconnect(reason) => Some(format!("{reason} ({})", self.why)),
            _ => None,
        }
    }

    /// DRBD's log line for a UUID correction the handshake made (`None`: none).
    pub(crate) fn correction(&self) -> Option<&'static str> {
        let h = self.handshake.as_ref()?;
        h.comparison.correction?;
        Some(match h.comparison.rule {
            34 => "was SyncSource, missed the resync finished event, corrected myself",
            35 => "was SyncTarget, peer missed the resync finished event, corrected peer",
            51 => "lost last syncUUID packet, corrected peer",
            _ => "last syncUUID did not get through, corrected myself",
        })
    }

    /// How a split brain was resolved (`None`: there was none, or it was not resolved).
    pub(crate) fn resolved(&self) -> Option<String> {
        let h = self.handshake.as_ref().filter(|h| h.split_brain)?;
        let how = match h.resolution {
            Some(SplitBrainResolution::AfterSbPolicy { primaries }) => {
                format!("by the after-sb-{primaries}pri policy")
            }
            Some(SplitBrainResolution::DiscardMyData) => "by discard-my-data".into(),
            None => "by the disk states".into(),
        };
        let loser = match self.outcome {
            HandshakeOutcome::SyncTarget { .. } => "this node's",
            HandshakeOutcome::Disconnect(_) => return None,
            _ => "the peer's",
        };
        Some(format!(
            "split brain resolved {how}: {loser} changes are discarded ({})",
            self.why
        ))
    }
}

impl Node {
    /// This node as its `P_UUIDS` and `P_STATE` describe it now (the bitmap weight is
    /// DRBD's `dirty_bits`).
    pub(crate) fn hello(&self) -> HandshakeSide {
        HandshakeSide {
            uuids: self.uuids,
            dirty_bits: self.primary.out_of_sync().count(),
            primary: self.role == Role::Primary,
            disk: self.disk,
            crashed_primary: self.crashed_primary,
            discard_my_data: self.discard_my_data,
        }
    }

    /// The peer answered this node's `sent` hello with `peer` (see the module docs).
    /// `Err`: this node changed since it sent `sent`; nothing is applied and the driver
    /// connects again. A refusal is an [`Agreement`] whose [`Agreement::refusal`] says
    /// why; it changes nothing either.
    pub(crate) fn agree(
        &mut self,
        sent: &HandshakeSide,
        peer: &HandshakeSide,
        ctx: &HandshakeCtx,
        policy: &SplitBrainPolicy,
    ) -> Result<Agreement, String> {
        let now = self.hello();
        if (
            now.uuids,
            now.primary,
            now.disk,
            now.crashed_primary,
            now.discard_my_data,
        ) != (
            sent.uuids,
            sent.primary,
            sent.disk,
            sent.crashed_primary,
            sent.discard_my_data,
        ) {
            return Err(format!(
                "this node changed during the handshake (sent UUIDs {}, {}, {}; now {}, {}, {}): \
                 connecting again",
                sent.uuids, sent.primary, sent.disk, now.uuids, now.primary, now.disk
            ));
        }
        if sent.disk <= DiskState::Failed || peer.disk <= DiskState::Failed {
            self.peer_uuids = peer.uuids;
            return Ok(Agreement {
                outcome: HandshakeOutcome::Connected,
                handshake: None,
                why: "a Diskless side".into(),
            });
        }
        let h = sync_handshake(sent, peer, ctx, policy);
        let outcome = refined(h.outcome, h.comparison.rule, sent, peer);
        let why = format!(
            "UUIDs here {}, peer {}; rule {}, {}",
            sent.uuids, peer.uuids, h.comparison.rule, h.hg
        );
        if !matches!(outcome, HandshakeOutcome::Disconnect(_)) {
            self.peer_uuids = peer.uuids;
            match h.comparison.correction {
                Some(c) if c.side == UuidSide::Mine => self.uuids = c.uuids,
                Some(c) => self.peer_uuids = c.uuids,
                None => {}
            }
        }
        Ok(Agreement {
            outcome,
            handshake: Some(h),
            why,
        })
    }

    /// The run the agreed `outcome` starts (`None`: none, Connected). A target compares
    /// checksums before it fetches a block when both nodes use crc32c (`csums`); with
    /// `csums-after-crash-only`, only when either node crashed as Primary
    /// (`peer_crashed`: the peer's flag), the case where most blocks are still equal.
    pub(crate) fn sync_role(
        &self,
        outcome: HandshakeOutcome,
        csums: bool,
        after_crash_only: bool,
        peer_crashed: bool,
    ) -> Option<SyncRole> {
        match outcome {
            HandshakeOutcome::SyncSource { .. } => Some(SyncRole::Source),
            HandshakeOutcome::SyncTarget { .. } => Some(SyncRole::Target {
                csums: csums && (!after_crash_only || self.crashed_primary || peer_crashed),
            }),
            HandshakeOutcome::Connected | HandshakeOutcome::Disconnect(_) => None,
        }
    }

    /// The blocks out of sync here that `known` lacks (`known`: the bitmap this node
    /// sent in the exchange OR the peer's, word for word): those marked since the
    /// snapshot. As `(sector, bytes)` ranges of at most `DRBD_MAX_BIO_SIZE` (what DRBD's
    /// `drbd_set_out_of_sync` accepts), the last clipped to the volume, in order. Each
    /// range is one `P_OUT_OF_SYNC`; there are at most as many as blocks written while
    /// the exchange ran.
    fn untold(&self, known: &[u64]) -> Vec<(u64, u32)> {
        let max_blocks = u64::from(DRBD_MAX_BIO_SIZE) / BLOCK_SIZE;
        let oos = self.primary.out_of_sync();
        let sectors = oos.sectors();
        let per_block = BLOCK_SIZE / u64::from(SECTOR);
        oos.runs_not_in(known, max_blocks)
            .into_iter()
            .filter_map(|(first, count)| {
                let sector = first * per_block;
                let end = ((first + count) * per_block).min(sectors);
                let bytes = u32::try_from(end.checked_sub(sector)? * u64::from(SECTOR)).ok()?;
                (bytes > 0).then_some((sector, bytes))
            })
            .collect()
    }

    /// What a SyncSource sends first once the bitmaps have crossed (`known` as for
    /// [`Self::untold`]): a `P_OUT_OF_SYNC` per untold range, then `P_SYNC_UUID` of
    /// `sync_uuid`. The driver queues them ahead of every other data packet, in the step
    /// that makes the Primary core replicate.
    pub(crate) fn source_start(&self, known: &[u64], sync_uuid: u64) -> Vec<Packet> {
        let mut pkts: Vec<Packet> = (self.untold(known).into_iter())
            .map(|(sector, blksize)| Packet::BlockDesc {
                cmd: Command::P_OUT_OF_SYNC,
                desc: BlockDesc {
                    sector,
                    blksize,
                    pad: 0,
                },
            })
            .collect();
        pkts.push(Packet::SyncUuid(sync_uuid));
        pkts
    }

    /// The bitmap this node sends in the exchange after a handshake that decided a
    /// resync; a full one marks every block first.
    pub(crate) fn exchange_bitmap(&mut self, full: bool) -> &OutOfSync {
        let oos = self.primary.out_of_sync_mut();
        if full {
            oos.mark_all();
        }
        oos
    }
}

/// The run a connection starts, as its handshake decided it ([`Node::sync_role`]) and the
/// driver configured it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RunStart {
    /// SyncTarget over the merged bitmap.
    Target(TargetConfig),
    /// SyncSource.
    Source(SourceConfig),
}

/// A connection whose handshake, and the bitmap exchange it decided, are done
/// ([`super::Event::ConnectionUp`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Up {
    /// The protocol version agreed.
    pub(crate) version: u32,
    /// The peer's role and disk as its handshake said.
    pub(crate) peer_role: Role,
    pub(crate) peer_disk: DiskState,
    /// The run it starts; `None`: Connected.
    pub(crate) run: Option<RunStart>,
    /// The peer has verify-alg (this node's `verify` may run).
    pub(crate) peer_verify: bool,
    pub(crate) tick: TickInput,
}

impl Node {
    /// A connection is up (see the module docs, "the connection's start").
    pub(super) fn up(&mut self, up: Up, out: &mut Vec<Action>) -> Result<(), StepError> {
        self.connection_up(up.version, up.peer_role, up.peer_disk);
        self.peer_verify = up.peer_verify;
        let started = match up.run {
            Some(RunStart::Target(cfg)) => self.start_target(cfg, &up.tick).map(|_| ()),
            Some(RunStart::Source(cfg)) => self.start_source(cfg, &up.tick),
            None => {
                if self.reached_connected() {
                    out.push(Action::CrashRepaired);
                }
                Ok(())
            }
        };
        started.map_err(|e| StepError::Peer(format!("cannot start the resync: {e}")))?;
        self.push_state(out);
        if self.role == Role::Primary {
            self.primary
                .connected()
                .map_err(|e| StepError::core("the connection's start", e))?;
        }
        Ok(())
    }
}

/// tandem's refinement of rules 20/30 (see the module docs).
fn refined(
    outcome: HandshakeOutcome,
    rule: u32,
    me: &HandshakeSide,
    peer: &HandshakeSide,
) -> HandshakeOutcome {
    let zero_fresh = |side: &HandshakeSide, other: &HandshakeSide| {
        side.uuids.is_just_created()
            && side.disk == DiskState::UpToDate
            && other.uuids.bitmap & !1 == UUID_JUST_CREATED
    };
    match (outcome, rule) {
        (HandshakeOutcome::SyncTarget { full: true }, 20) if zero_fresh(me, peer) => {
            HandshakeOutcome::SyncTarget { full: false }
        }
        (HandshakeOutcome::SyncSource { full: true }, 30) if zero_fresh(peer, me) => {
            HandshakeOutcome::SyncSource { full: false }
        }
        (o, _) => o,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::resync::{TargetConfig, TickInput};
    use crate::state::uuid::UuidSet;

    const VERSION: u32 = 101;

    fn node(uuids: UuidSet, disk: DiskState) -> Node {
        Node::for_test(2048, uuids, disk)
    }

    fn ctx() -> HandshakeCtx {
        HandshakeCtx {
            agreed_version: VERSION,
            wsame: true,
            resolve_conflicts: false,
        }
    }

    fn peer(uuids: UuidSet, disk: DiskState) -> HandshakeSide {
        HandshakeSide {
            uuids,
            dirty_bits: 0,
            primary: false,
            disk,
            crashed_primary: false,
            discard_my_data: false,
        }
    }

    fn set(current: u64, bitmap: u64, h0: u64, h1: u64) -> UuidSet {
        UuidSet {
            current,
            bitmap,
            history: [h0, h1],
        }
    }

    /// Rule 34: the SyncSource missed the end of the last resync (its bitmap UUID is
    /// still set; the peer rotated it into history). The correction rotates it here too,
    /// so the run's sync UUID is a new one, as on a kernel DRBD node.
    #[test]
    fn rule_34_corrects_this_node_s_uuids_before_the_run() {
        let mut n = node(set(0xA0, 0xB0, 0xC0, 0), DiskState::UpToDate);
        let sent = n.hello();
        let them = peer(set(0xA0, 0, 0xB0, 0xC0), DiskState::UpToDate);
        let a = n
            .agree(&sent, &them, &ctx(), &SplitBrainPolicy::default())
            .unwrap();
        assert_eq!(a.outcome, HandshakeOutcome::SyncSource { full: false });
        assert!(a.refusal().is_none() && a.resolved().is_none());
        assert!(a.correction().unwrap().contains("corrected myself"));
        assert_eq!(n.uuids, set(0xA0, 0, 0xB0, 0xC0));
        let (uuids, sync_uuid) = n.begin_sync_source(0x1234);
        assert_eq!(sync_uuid, 0x1234, "not the stale bitmap UUID + 2^48");
        assert_eq!(uuids, set(0xA0, 0x1234, 0xB0, 0xC0));
    }

    /// Rule 35: the peer missed the end of the last resync; its corrected UUIDs are what
    /// this node's target run completes with.
    #[test]
    fn rule_35_corrects_the_peer_s_uuids_that_the_target_completes_with() {
        let mut n = node(set(0xA0, 0, 0xB0, 0xC0), DiskState::UpToDate);
        let sent = n.hello();
        let them = peer(set(0xA0, 0xB0, 0xC0, 0), DiskState::UpToDate);
        let a = n
            .agree(&sent, &them, &ctx(), &SplitBrainPolicy::default())
            .unwrap();
        assert_eq!(a.outcome, HandshakeOutcome::SyncTarget { full: false });
        assert!(a.correction().unwrap().contains("corrected peer"));
        assert_eq!(n.uuids, sent.uuids, "this node's UUIDs are unchanged");
        assert_eq!(n.peer_uuids, set(0xA0, 0, 0xB0, 0xC0));
        n.connection_up(VERSION, Role::Secondary, DiskState::UpToDate);
        n.begin_sync_target(0xB0 + (1 << 48));
        let cfg = TargetConfig::new(2048);
        let run = n.start_target(cfg, &TickInput::default()).unwrap();
        let end = n.target_end(run, Some(n.peer_uuids));
        let (_, done) = end.uuids.unwrap();
        assert_eq!(done.current & !1, 0xA0);
        assert_eq!(done.bitmap, 0);
    }

    /// The peer decided on what this node sent: a node that changed since refuses, and
    /// applies nothing.
    #[test]
    fn a_node_that_changed_since_its_hello_refuses() {
        let mut n = node(set(0xA0, 0xB0, 0xC0, 0), DiskState::UpToDate);
        let sent = n.hello();
        n.uuids.current = 0xD0;
        let them = peer(set(0xA0, 0, 0xB0, 0xC0), DiskState::UpToDate);
        let err = n.agree(&sent, &them, &ctx(), &SplitBrainPolicy::default());
        assert!(err.unwrap_err().contains("changed during the handshake"));
        assert_eq!(n.uuids.current, 0xD0);
        assert_eq!(n.uuids.bitmap, 0xB0, "no correction applied");
    }

    /// An unresolved split brain is refused with DRBD's reason; no correction, no peer
    /// UUIDs kept.
    #[test]
    fn an_unresolved_split_brain_is_refused_and_changes_nothing() {
        let mine = set(0xA0, 0xB0, 0, 0);
        let mut n = node(mine, DiskState::UpToDate);
        let sent = n.hello();
        let them = peer(set(0xE0, 0xB0, 0, 0), DiskState::UpToDate);
        let a = n
            .agree(&sent, &them, &ctx(), &SplitBrainPolicy::default())
            .unwrap();
        assert!(
            matches!(a.outcome, HandshakeOutcome::Disconnect(_)),
            "{a:?}"
        );
        assert!(
            a.refusal().unwrap().contains("rule 90"),
            "{:?}",
            a.refusal()
        );
        assert!(a.resolved().is_none());
        assert_eq!(n.uuids, mine);
        assert_ne!(n.peer_uuids, them.uuids);
    }

    /// discard-my-data resolves it: this node's changes are discarded.
    #[test]
    fn discard_my_data_resolves_a_split_brain_here() {
        let mut n = node(set(0xA0, 0xB0, 0, 0), DiskState::UpToDate);
        n.discard_my_data = true;
        let sent = n.hello();
        assert!(sent.discard_my_data);
        let them = peer(set(0xE0, 0xB0, 0, 0), DiskState::UpToDate);
        let a = n
            .agree(&sent, &them, &ctx(), &SplitBrainPolicy::default())
            .unwrap();
        assert_eq!(a.outcome, HandshakeOutcome::SyncTarget { full: false });
        let why = a.resolved().unwrap();
        assert!(
            why.contains("by discard-my-data: this node's changes"),
            "{why}"
        );
        n.connection_up(VERSION, Role::Secondary, DiskState::UpToDate);
        assert!(!n.discard_my_data, "it holds until a connection");
    }

    /// The run an agreement starts; checksums only when both nodes use them, and with
    /// csums-after-crash-only only after a crash of either node as Primary.
    #[test]
    fn the_run_and_its_checksums_follow_the_agreement_and_the_crash_flags() {
        let mut n = node(set(0xA0, 0, 0, 0), DiskState::UpToDate);
        let target = HandshakeOutcome::SyncTarget { full: false };
        let src = HandshakeOutcome::SyncSource { full: true };
        assert_eq!(n.sync_role(src, true, true, true), Some(SyncRole::Source));
        assert_eq!(
            n.sync_role(HandshakeOutcome::Connected, true, false, false),
            None
        );
        let csums = |csums| Some(SyncRole::Target { csums });
        assert_eq!(n.sync_role(target, false, false, true), csums(false));
        assert_eq!(n.sync_role(target, true, false, false), csums(true));
        assert_eq!(n.sync_role(target, true, true, false), csums(false));
        assert_eq!(n.sync_role(target, true, true, true), csums(true));
        n.crashed_primary = true;
        assert_eq!(n.sync_role(target, true, true, false), csums(true));
    }

    /// tandem's refinement: a consistent just-created disk facing a node that left the
    /// just-created generation by writing without it syncs the bitmap only; a
    /// Diskless side connects without the sync handshake.
    #[test]
    fn a_zeroed_new_disk_syncs_the_bitmap_and_a_diskless_side_just_connects() {
        let fresh = set(UUID_JUST_CREATED, 0, 0, 0);
        let mut n = node(fresh, DiskState::UpToDate);
        let sent = n.hello();
        let them = peer(set(0xA0, UUID_JUST_CREATED, 0, 0), DiskState::UpToDate);
        let a = n
            .agree(&sent, &them, &ctx(), &SplitBrainPolicy::default())
            .unwrap();
        assert_eq!(
            a.handshake.unwrap().outcome,
            HandshakeOutcome::SyncTarget { full: true }
        );
        assert_eq!(a.outcome, HandshakeOutcome::SyncTarget { full: false });
        let mut inc = node(fresh, DiskState::Inconsistent);
        let sent = inc.hello();
        let a = inc
            .agree(&sent, &them, &ctx(), &SplitBrainPolicy::default())
            .unwrap();
        assert_eq!(a.outcome, HandshakeOutcome::SyncTarget { full: true });
        let mut gone = node(set(0xA0, 0, 0, 0), DiskState::Diskless);
        let sent = gone.hello();
        let them = peer(set(0xE0, 0xB0, 0, 0), DiskState::UpToDate);
        let a = gone
            .agree(&sent, &them, &ctx(), &SplitBrainPolicy::default())
            .unwrap();
        assert_eq!(
            (a.outcome, a.handshake),
            (HandshakeOutcome::Connected, None)
        );
    }

    /// The blocks a SyncSource marked after its exchange snapshot are told in ranges of
    /// at most 1 MiB, the last one clipped to the volume's odd end.
    #[test]
    fn blocks_marked_after_the_snapshot_are_told_in_bounded_ranges() {
        // 2 MiB + 3 sectors: 513 blocks, the last one partial.
        let mut n = Node::for_test(4096 + 3, set(0xA0, 0, 0, 0), DiskState::UpToDate);
        let oos = n.primary.out_of_sync_mut();
        oos.mark(0, 8192);
        let known = oos.words().to_vec();
        assert!(n.untold(&known).is_empty(), "everything was sent");
        let oos = n.primary.out_of_sync_mut();
        oos.mark(8, 4096); // block 1: known already
        oos.mark(16, 300 * 4096); // blocks 2..302
        oos.mark(4096, 1536); // the last, partial block
        assert_eq!(
            n.untold(&known),
            vec![(16, 1 << 20), (16 + 2048, 44 * 4096), (4096, 1536)]
        );
        let pkts = n.source_start(&known, 0x77);
        assert_eq!(pkts.len(), 4);
        assert!(matches!(
            pkts[1],
            Packet::BlockDesc { cmd: Command::P_OUT_OF_SYNC, desc } if desc.sector == 16 + 2048
        ));
        assert_eq!(pkts[3], Packet::SyncUuid(0x77), "P_SYNC_UUID last");
    }
}
