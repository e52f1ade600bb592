//! The simulator's resync: what both nodes do when the connection comes up, and the
//! split-brain fault.
//!
//! Each node keeps its generation UUIDs ([`UuidSet`], with DRBD's life-cycle calls: the
//! Primary makes a new current UUID when it loses the peer or is restarted after a crash,
//! the promoted Secondary when it is promoted without its peer) and its bitmap. At
//! connection-up both run [`sync_handshake`] on the same facts seen from their side (who
//! holds `RESOLVE_CONFLICTS` is drawn per connection). If they agree on a resync, the
//! SyncSource's bitmap goes to the SyncTarget through the real [`BitmapSender`] /
//! [`BitmapReceiver`] and the codec, is OR-merged, and the merged bitmap comes back; the
//! SyncSource then sends `P_SYNC_UUID` and starts a source, the SyncTarget a target —
//! each node when its own exchange is done, through its step ([`Event::ConnectionUp`], as
//! the daemon's `connection_up`; without a resync both nodes at once: Connected) — each
//! node in its own [`SyncRuns`], the daemon's type: its rules (run ids, held writes,
//! writes in flight at the start, the failed-write rule, the end of a run, stream
//! classes) are the daemon's. Each node's resync events enter through [`Node::step`] as
//! the daemon's do (a packet, a reply's data, the clock, a read or write that ended), and
//! this file only performs the actions its drain returns (`source_action`,
//! `target_action`) with the simulated disks and streams. Every resync packet goes
//! through the codec and travels one of four ordered streams (Primary→Secondary data and
//! meta, Secondary→Primary data and meta) by its stream class, with the network's delays;
//! a connection loss drops what is in flight, ends both runs (their IO completes into
//! nothing) and the next connection resumes from the bitmaps and the target's resume
//! position.
//!
//! The Primary node's bitmap is its core's (`Primary::out_of_sync`), as in the daemon:
//! the core marks (a write started while disconnected, a failed local write, a
//! `P_NEG_ACK`, every write not barrier-acked at a connection loss), the exchange
//! OR-merges the peer's bitmap into it, and the runs clear what the source's acks say
//! (the node lends it to them inside each step). A restart loads it from the metadata
//! device. A mirror of the transfer log (`p_tl`) checks the Secondary's barrier acks and
//! `P_NEG_ACK`s against what was sent. One rule the simulator found necessary: a block
//! whose local write failed on the Primary during this connection is not cleared by a
//! resync ack ([`crate::replica::FailedLocal`], inside the runs): the reply may have been
//! read before the failure left garbage there, and the SyncTarget does not know of the
//! failure (DRBD detaches the disk on such an error; the Primary core marks the block and
//! goes on). It is resynced after the next handshake.
//!
//! Application writes during a resync: on the Primary every local write is reported to
//! the source from its submission to its local completion; on the Secondary every
//! replicated write to the target from its submission by the Secondary core (where the
//! daemon gates it) to its local completion, and one the target holds is submitted when
//! the runs release it. (Neither core sends
//! `DP_MAY_SET_IN_SYNC`, so replicated writes clear no bits: a block stays out of sync
//! until resync copies it.) When the target finishes with no failed block, the
//! Secondary flushes its disk, finishes its UUIDs (UpToDate), ends the run
//! (`SyncRuns::end_recorded`) and tells the Primary (its `P_STATE`, UpToDate and
//! Connected, through the codec on the meta stream: DRBD's state change), whose node
//! finishes its own run on it (`Event::PeerState`, as in the daemon). Lost,
//! that notice leaves the Primary's bitmap UUID set, and the next handshake corrects it
//! (rule 34).
//!
//! The bitmap exchange takes the deliveries of its packets. A Primary SyncSource writes on
//! meanwhile, locally (its core replicates only once the Secondary's bitmap is in, as in
//! the daemon); the blocks it marks after its own bitmap went out are told by
//! `P_OUT_OF_SYNC` (`Node::source_start`) ahead of `P_SYNC_UUID`, and checker 7 asks that the
//! target start with every block the source then marks (CI found the daemon without
//! this rule; `sim::tests::a_source_that_does_not_tell_its_exchange_writes_is_caught`).
//!
//! Simplifications against DRBD: the `P_UUIDS`/`P_STATE` exchange is instantaneous
//! (both handshakes run at the connection-up event); the connection waits until both
//! nodes' runs are idle and the Secondary's writes are done. Bounds: the machines' own
//! (drawn: ≤ 64 requests, ≤ 64 queued, ≤ 16 reads), four streams whose contents are
//! bounded by those (plus one `P_OUT_OF_SYNC` per block at most), one bitmap transfer
//! per direction per connection.

use super::rng::Rng;
use super::{pattern, DataMsg, Ev, MetaMsg, SBuf, Sim, SimParams, SECTORS, SECTORS_PER_BLOCK};
use crate::net::Stream;
use crate::replica::{
    promoted_uuids, Action, Durable, GenerationFacts, LocalWrite, Node, ReadFor, RunRead, Side,
    SyncRole, SyncRuns, TargetEnd,
};
use crate::replica::{Admin, Event, Outcome, RunStart, SourceEnd, Up};
use crate::request::{OutOfSync, Primary, SECTOR};
use crate::resync::{
    Digest, Inbound, RateConfig, ReadOutcome, ResyncSummary, SourceConfig, TargetConfig, TickInput,
    SLEEP_TIME_MS,
};
use crate::state::uuid::{
    AfterSb0Pri, AfterSb1Pri, DisconnectReason, Handshake, HandshakeCtx, HandshakeOutcome,
    HandshakeSide, SplitBrainPolicy, UuidSet, UuidSide, UUID_JUST_CREATED,
};
use crate::state::{ConnState, DiskState, Role};
use crate::wire::dp;
use crate::wire::{
    decode_frame, encode, ff, BitmapReceiver, BitmapSender, Command, Packet, WireCtx,
};
use std::collections::{BTreeMap, VecDeque};

/// The version (write id) of the promoted Secondary's own writes: far above every request
/// id, so that its data is recognisable and never taken for the Primary's.
const SB_ID: u64 = 1 << 62;

/// The agreed protocol of the simulated connection.
const AGREED: u32 = 101;

/// Resync and split-brain settings a seed chose.
#[derive(Debug, Clone)]
pub struct ResyncParams {
    /// The SyncTarget's rate settings (fixed or dynamic, sometimes `c-min-rate`).
    pub rate: RateConfig,
    /// Largest resync request.
    pub max_bio_size: u32,
    /// Checksum-based resync, and its largest request.
    pub csums: Option<u32>,
    /// `rs-discard-granularity` (thin requests and `P_RS_DEALLOCATED`), 0 = off.
    pub thin_granularity: u32,
    /// SyncTarget: requests in flight.
    pub max_requests: usize,
    /// SyncSource: requests queued / reads in flight.
    pub source_queue: usize,
    /// SyncSource: local reads in flight.
    pub source_reads: usize,
    /// Failure rate (per million) of resync reads on both disks.
    pub read_fail_ppm: u64,
    /// `use-rle` for the bitmap exchange.
    pub use_rle: bool,
    /// The split-brain fault comes once this many requests were issued (at the first
    /// moment the replicas are in sync after that).
    pub split_brain_after_ops: Option<u32>,
    /// Writes the promoted Secondary makes.
    pub split_brain_writes: u64,
    /// The Primary's after-split-brain policies (the Secondary's are the same, with
    /// discard-local and discard-remote swapped).
    pub policy: SplitBrainPolicy,
}

impl ResyncParams {
    pub(super) fn draw(rng: &mut Rng, max_ops: u32) -> Self {
        let fixed = rng.chance(600_000);
        let rate = RateConfig {
            // Fixed: 10 … 200 blocks per 100 ms step on the 256-block volume.
            resync_rate: u32::try_from(rng.range(400, 8000)).unwrap_or(400),
            c_plan_ahead: if fixed {
                0
            } else {
                u32::try_from(rng.range(1, 20)).unwrap_or(1)
            },
            c_delay_target: u32::try_from(rng.range(1, 20)).unwrap_or(1),
            c_fill_target: if rng.chance(500_000) {
                0
            } else {
                u32::try_from(rng.range(8, 2048)).unwrap_or(8)
            },
            c_max_rate: u32::try_from(rng.range(250, 100_000)).unwrap_or(250),
            c_min_rate: if rng.chance(300_000) {
                u32::try_from(rng.range(1, 4000)).unwrap_or(1)
            } else {
                0
            },
            max_buffers: u32::try_from(rng.range(32, 512)).unwrap_or(32),
        };
        let max_bio_size: u32 = 4096 << rng.below(9);
        let csums = rng
            .chance(300_000)
            .then(|| 4096u32 << rng.below(u64::from((max_bio_size / 4096).trailing_zeros()) + 1));
        let thin_granularity = if rng.chance(300_000) {
            4096u32 << rng.below(4)
        } else {
            0
        };
        let policy = if rng.chance(350_000) {
            SplitBrainPolicy::default()
        } else {
            let p0 = AfterSb0Pri::ALL;
            let p1 = AfterSb1Pri::ALL;
            SplitBrainPolicy {
                after_sb_0pri: p0
                    .get(usize::try_from(rng.below(p0.len() as u64)).unwrap_or(0))
                    .copied()
                    .unwrap_or_default(),
                after_sb_1pri: p1
                    .get(usize::try_from(rng.below(p1.len() as u64)).unwrap_or(0))
                    .copied()
                    .unwrap_or_default(),
                ..SplitBrainPolicy::default()
            }
        };
        ResyncParams {
            rate,
            max_bio_size,
            csums,
            thin_granularity,
            max_requests: usize::try_from(rng.range(1, 64)).unwrap_or(1),
            source_queue: usize::try_from(rng.range(1, 64)).unwrap_or(1),
            source_reads: usize::try_from(rng.range(1, 16)).unwrap_or(1),
            read_fail_ppm: if rng.chance(500_000) {
                0
            } else {
                rng.range(1_000, 15_000)
            },
            use_rle: rng.chance(800_000),
            split_brain_after_ops: rng
                .chance(300_000)
                .then(|| u32::try_from(rng.range(1, u64::from(max_ops))).unwrap_or(1)),
            split_brain_writes: rng.range(1, 6),
            policy,
        }
    }

    /// The Secondary's policies: the Primary's, with discard-local/remote swapped
    /// (`P_PROTOCOL` requires that pairing).
    fn peer_policy(&self) -> SplitBrainPolicy {
        let mut p = self.policy;
        p.after_sb_0pri = match p.after_sb_0pri {
            AfterSb0Pri::DiscardLocal => AfterSb0Pri::DiscardRemote,
            AfterSb0Pri::DiscardRemote => AfterSb0Pri::DiscardLocal,
            other => other,
        };
        p
    }
}

/// A SyncSource read of the Primary's disk (`Ev::PRead`).
#[derive(Debug)]
pub(super) struct ReadEv {
    tag: u64,
    sector: u64,
    len: u32,
    digest: bool,
    zero_check: bool,
    fail: bool,
    pub(super) inc: u64,
    /// The run of the SyncSource that asked.
    run: u64,
}

/// A SyncTarget write of reply data (`data`) or zeroes (`None`), with the versions the
/// SyncSource read (`Ev::SRsWrite`).
#[derive(Debug)]
pub(super) struct RsWriteEv {
    tag: u64,
    sector: u64,
    data: Option<Vec<u8>>,
    vers: Vec<u64>,
    fail: bool,
    /// The run of the SyncTarget that asked.
    run: u64,
}

/// An entry of the mirror of the Primary core's transfer log.
#[derive(Debug, Clone, Copy)]
pub(super) enum Tl {
    Write { block_id: u64 },
    Barrier(u32),
}

/// A message of the Secondary→Primary data stream.
#[derive(Debug)]
pub(super) enum BackMsg {
    /// The SyncTarget's (merged) bitmap.
    Bitmap(Packet),
    /// `P_RS_DATA_REQUEST`, `P_RS_THIN_REQ` or `P_CSUM_RS_REQUEST`.
    Rs(Packet),
}

/// The split-brain fault's progress.
#[derive(Debug, PartialEq, Eq)]
enum Sb {
    NotYet,
    Scheduled,
    /// The Secondary is Primary on its own; writes still to come.
    Writing {
        left: u64,
    },
    /// Demoted again; the next handshake sees the split brain.
    Happened,
    /// A handshake refused it; the Secondary's disk as it was then (checker 8). The
    /// operator then connects the Secondary with discard-my-data, or, if the UUIDs no
    /// longer share a generation (`unrelated`), re-creates its metadata.
    Refused {
        snap: Vec<u8>,
        unrelated: bool,
    },
    /// Connecting with discard-my-data until the Secondary is SyncTarget.
    Resolving,
    /// The Secondary's metadata was re-created (create-md): a full sync follows.
    Recreated,
    /// The Secondary became SyncTarget: its generation is the Primary's again.
    Resolved,
}

/// Who loses a split brain (becomes SyncTarget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loser {
    Primary,
    Secondary,
}

/// What a handshake decided for the connection.
enum Decision {
    Refused { unrelated: bool },
    Connected,
    Sync { full: bool },
}

/// Both nodes' resync state.
pub(super) struct Rs {
    rng: Rng,
    params: ResyncParams,
    pub(super) ctx: WireCtx,
    // ---- the Primary's node
    /// Mirror of the core's transfer log (checks barrier acks and negative acks).
    pub(super) p_tl: VecDeque<Tl>,
    /// The bitmap transfer the Primary receives.
    p_rx: Option<(BitmapReceiver, Vec<u64>)>,
    /// The bitmap the Primary sent in this connection's exchange: its writes from then
    /// until it starts replicating are told by `P_OUT_OF_SYNC` (`Node::source_start`).
    p_sent: Vec<u64>,
    /// The SyncSource's bitmap when it starts replicating: the SyncTarget's must hold
    /// it at its start (checker 7).
    p_at_sync: Vec<u64>,
    /// Read buffers of the SyncSource: tag → first sector, data and the versions it was
    /// read at.
    p_reads: BTreeMap<u64, (u64, Vec<u8>, Vec<u64>)>,
    /// Versions of the read being answered (for `P_RS_DEALLOCATED`).
    read_ctx: Option<Vec<u64>>,
    /// Sectors of application writes submitted on the Primary's disk (c-min-rate).
    p_app_sectors: u64,
    // ---- the Secondary's node
    /// The bitmap transfer the Secondary receives.
    s_rx: Option<(BitmapReceiver, Vec<u64>)>,
    /// The run the Secondary's last agreement chose (`Node::sync_role`).
    s_role: Option<SyncRole>,
    /// Each node's side of the last handshake (the Primary's, the Secondary's), which it
    /// learns once its exchange is done ([`Event::ConnectionUp`]).
    ups: Option<(Up, Up)>,
    /// The finished run whose end is being made durable.
    pub(super) s_finish: Option<TargetEnd>,
    /// Versions of the zeroes of the `P_RS_DEALLOCATED` being handled.
    zero_vers: Option<Vec<u64>>,
    /// Sectors of replicated writes received (c-min-rate).
    s_app_sectors: u64,
    /// Blocks the Secondary holds out of sync that the Primary core never marked: its
    /// split-brain writes, and a full sync after its metadata was re-created. (Every
    /// other bit of either bitmap goes back to a mark of the core, which never clears
    /// its bits.) Checker 6 accepts these too.
    s_only: OutOfSync,
    /// Per sector: the Secondary's content may be newer than the Primary's and still be
    /// discarded by resync (the Primary lost it in a crash, or it is the promoted
    /// Secondary's own write). Cleared when a write from the Primary lands there.
    pub(super) s_disc: Vec<bool>,
    // ---- the connection
    back: VecDeque<BackMsg>,
    back_ready: u64,
    back_parked: u64,
    fwd: VecDeque<Packet>,
    fwd_ready: u64,
    sb: Sb,
    #[cfg(test)]
    sabotage: super::Sabotage,
}

/// Day 0: both disks hold one generation (after the initial sync), the Primary is
/// promoted while connected (no new UUID, bit 0 set). The Primary's UUIDs, then the
/// Secondary's.
pub(super) fn day0(rng: &mut Rng) -> (UuidSet, UuidSet) {
    let g = uuid(rng) & !1;
    let s_uuids = UuidSet {
        current: g,
        bitmap: 0,
        history: [0; 2],
    };
    (promoted(s_uuids, rng), s_uuids)
}

/// Day 0's promotion of the Primary while connected, by the daemon's rule
/// ([`promoted_uuids`]; the pair is not just created: no announcement).
fn promoted(uuids: UuidSet, rng: &mut Rng) -> UuidSet {
    let facts = GenerationFacts {
        peer_disk_reachable: true,
        agreed_version: AGREED,
        disk: DiskState::UpToDate,
        peer_disk: DiskState::UpToDate,
        source_running: false,
        force: false,
    };
    promoted_uuids(uuids, &facts, || uuid(rng)).0
}

/// The operator's `primary` on a node that is not connected, through the node's events
/// (`sim/roles.rs`): its metadata durable at once (the model has no superblock: the
/// UUIDs it assigned are the durable ones). One draw (alone, no pair's first generation
/// to announce).
pub(super) fn promote_alone(
    node: &mut Node,
    rng: &mut Rng,
    out: &mut Vec<Action>,
) -> Result<(), String> {
    let r = uuid(rng);
    super::roles::promote(node, None, [r, r], |_, _| Ok(true), out)?;
    match out.drain(..).next() {
        Some(a) => Err(format!("a promotion without a peer asked for {a:?}")),
        None => Ok(()),
    }
}

/// A random generation UUID (never 0 or `JUST_CREATED` with bit 0 masked).
pub(super) fn uuid(rng: &mut Rng) -> u64 {
    loop {
        let v = rng.next_u64();
        let m = v & !1;
        if m != 0 && m != UUID_JUST_CREATED {
            return v;
        }
    }
}

impl Rs {
    /// The resync state of both nodes.
    pub(super) fn new(rng: Rng, params: &SimParams) -> Result<Self, String> {
        Ok(Rs {
            rng,
            params: params.resync.clone(),
            ctx: WireCtx::new(AGREED, ff::PRO_FEATURES_84).map_err(|e| e.to_string())?,
            p_tl: VecDeque::new(),
            p_rx: None,
            p_sent: Vec::new(),
            p_at_sync: Vec::new(),
            p_reads: BTreeMap::new(),
            read_ctx: None,
            p_app_sectors: 0,
            s_rx: None,
            s_role: None,
            ups: None,
            s_finish: None,
            zero_vers: None,
            s_app_sectors: 0,
            s_only: OutOfSync::new(SECTORS as u64),
            s_disc: vec![false; SECTORS],
            back: VecDeque::new(),
            back_ready: 0,
            back_parked: 0,
            fwd: VecDeque::new(),
            fwd_ready: 0,
            sb: Sb::NotYet,
            #[cfg(test)]
            sabotage: super::Sabotage::default(),
        })
    }

    #[cfg(test)]
    pub(super) fn set_sabotage(&mut self, s: super::Sabotage) {
        self.sabotage = s;
    }

    /// The nodes traded places (a switchover, at quiescence: the streams, the transfer
    /// log and the runs are empty): each node keeps its application IO count; what the
    /// Secondary alone knew (its split-brain writes, the versions resync discarded) is
    /// history once the disks are equal, and the new Secondary has none.
    pub(super) fn trade_places(&mut self) {
        std::mem::swap(&mut self.p_app_sectors, &mut self.s_app_sectors);
        self.s_only = OutOfSync::new(SECTORS as u64);
        self.s_disc.fill(false);
    }

    /// A `P_NEG_ACK` names a write of the transfer log.
    pub(super) fn tl_neg_ack(&self, block_id: u64) -> Result<(), String> {
        if self
            .p_tl
            .iter()
            .any(|t| matches!(*t, Tl::Write { block_id: b } if b == block_id))
        {
            return Ok(());
        }
        Err(format!(
            "P_NEG_ACK for {block_id:#x}, not in the transfer log"
        ))
    }

    /// `P_BARRIER_ACK(nr)`: the epoch's writes leave the transfer log.
    pub(super) fn tl_barrier_ack(&mut self, nr: u32, size: u32) -> Result<(), String> {
        let mut n = 0u32;
        while let Some(t) = self.p_tl.pop_front() {
            match t {
                Tl::Write { .. } => n += 1,
                Tl::Barrier(b) if b == nr && n == size => return Ok(()),
                Tl::Barrier(b) => {
                    return Err(format!(
                        "P_BARRIER_ACK({nr}, {size}) but the transfer log has barrier {b} after \
                         {n} writes"
                    ))
                }
            }
        }
        Err(format!("P_BARRIER_ACK({nr}) with no such barrier sent"))
    }

    /// Power loss of the Primary's node: its SyncSource and reads are gone (the reads in
    /// flight never complete; the node's runs start afresh, `Sim::primary_crashed`).
    pub(super) fn forget_primary_io(&mut self) {
        self.p_tl.clear();
        self.p_reads.clear();
        self.p_rx = None;
    }

    /// Whether block `b` differs for a reason the Primary core never marked (checker 6).
    pub(super) fn s_only(&self, b: u64) -> bool {
        self.s_only.is_set(b)
    }

    /// Blocks out of sync on either node (each node's bitmap is its Primary core's).
    pub(super) fn out_of_sync(p_bm: &OutOfSync, s_bm: &OutOfSync) -> OutOfSync {
        let mut bm = p_bm.clone();
        or_bits(&mut bm, s_bm.words().iter().copied());
        bm
    }
}

/// ORs the bits of `words` (64 blocks each, LSB first) into `bm`.
fn or_bits(bm: &mut OutOfSync, words: impl Iterator<Item = u64>) {
    for (i, mut w) in words.enumerate() {
        while w != 0 {
            let bit = u64::from(w.trailing_zeros());
            w &= w - 1;
            bm.mark_blocks(i as u64 * 64 + bit, 1);
        }
    }
}

/// What the after-sb policies decide for a split brain between the Primary (Primary
/// before and after the split, `cp` changes) and the Secondary (promoted during it,
/// demoted again, `cs` changes), written from the policy table of `state/uuid.rs`
/// independently of its code. `rc_p`: the Primary holds `RESOLVE_CONFLICTS` (the holder
/// loses a tie). `None`: no decision (split brain, disconnect).
fn expected_loser(policy: &SplitBrainPolicy, cp: u64, cs: u64, rc_p: bool) -> Option<Loser> {
    let tie = if rc_p {
        Loser::Primary
    } else {
        Loser::Secondary
    };
    let zero = || match (cp == 0, cs == 0) {
        (true, true) => Some(tie),
        (_, true) => Some(Loser::Secondary),
        (true, _) => Some(Loser::Primary),
        _ => None,
    };
    let least = || match cp.cmp(&cs) {
        std::cmp::Ordering::Less => Loser::Primary,
        std::cmp::Ordering::Greater => Loser::Secondary,
        std::cmp::Ordering::Equal => tie,
    };
    // The Primary was Primary before the split, the Secondary was not.
    let p0 = match policy.after_sb_0pri {
        AfterSb0Pri::Disconnect => None,
        AfterSb0Pri::DiscardYoungerPrimary => Some(Loser::Secondary),
        AfterSb0Pri::DiscardOlderPrimary => Some(Loser::Primary),
        AfterSb0Pri::DiscardZeroChanges => zero(),
        AfterSb0Pri::DiscardLeastChanges => Some(least()),
        AfterSb0Pri::DiscardLocal => Some(Loser::Primary),
        AfterSb0Pri::DiscardRemote => Some(Loser::Secondary),
    };
    // One Primary now.
    match policy.after_sb_1pri {
        AfterSb1Pri::Disconnect | AfterSb1Pri::CallPriLostAfterSb => None,
        AfterSb1Pri::DiscardSecondary => Some(Loser::Secondary),
        AfterSb1Pri::Consensus => p0.filter(|&l| l == Loser::Secondary),
        AfterSb1Pri::ViolentlyAs0p => p0,
    }
}

impl Sim {
    // ----- connection up: the handshake -------------------------------------------------

    /// The previous connection's resync IO, the Secondary's writes and the split-brain
    /// writer are done (DRBD, too, waits for the old connection's requests before it
    /// connects again; so does the daemon, `Volume::wait_sync_io_idle`).
    fn connect_ready(&self) -> bool {
        !matches!(self.rs.sb, Sb::Writing { .. })
            && self.sn.runs.idle()
            && self.pn.runs.idle()
            && !self.s_writes_pending()
    }

    /// Before each handshake, after a refused one: checker 8 (a refused connection
    /// changed neither disk: the Primary's only takes its application's writes, checker
    /// 1; nothing else may touch the Secondary's), and the operator's resolution.
    /// `true`: the Secondary connects with discard-my-data.
    fn after_refusal(&mut self) -> Result<bool, String> {
        let mut recreate = false;
        let resolving = if let Sb::Refused { snap, unrelated } = &self.rs.sb {
            recreate = *unrelated;
            if *snap != self.sdisk.cache {
                let b = snap
                    .chunks(4096)
                    .zip(self.sdisk.cache.chunks(4096))
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "checker 8: the secondary's disk changed after a refused handshake (block {b})"
                ));
            }
            true
        } else {
            false
        };
        if recreate {
            // DRBD 8.4 keeps two history UUIDs: a split brain whose resolution was cut
            // twice after the Primary's sync UUID (each rotates its history) leaves no
            // shared generation, "unrelated data". The operator runs create-md on the
            // Secondary: a just-created disk, fully synced from the Primary.
            self.report.sb_recreated += 1;
            self.sn.uuids = UuidSet::JUST_CREATED;
            self.sn.disk = DiskState::Inconsistent;
            *self.sn.primary.out_of_sync_mut() = OutOfSync::new(SECTORS as u64);
            self.sn.runs.forget_resume_position();
            self.rs.sb = Sb::Recreated;
        }
        Ok(!recreate && (resolving || self.rs.sb == Sb::Resolving))
    }

    /// The after-sb policies of the Primary and the Secondary: the operator resolves a
    /// refused split brain (`resolving`) with discard-my-data on the Secondary and the
    /// default policies.
    fn policies(&self, resolving: bool) -> (SplitBrainPolicy, SplitBrainPolicy) {
        if resolving {
            (SplitBrainPolicy::default(), SplitBrainPolicy::default())
        } else {
            (self.rs.params.policy, self.rs.params.peer_policy())
        }
    }

    /// The connection comes up: both nodes' handshake, then the bitmap exchange if they
    /// agree on a resync (see the module docs).
    pub(super) fn connect(&mut self) -> Result<(), String> {
        if !self.connect_ready() {
            self.reconnect_pending = true;
            let d = self.rs.rng.range(5, 30);
            self.at(d, Ev::Reconnect);
            return Ok(());
        }
        self.report.handshakes += 1;
        self.check14_before_handshake()?;
        let resolving = self.after_refusal()?;
        let split = resolving || self.rs.sb == Sb::Happened;
        let (pol_p, pol_s) = self.policies(resolving);
        let rc_p = self.rs.rng.chance(500_000);
        // Both nodes' handshake (`replica::Node::hello`, then `agree` on what each sent).
        // (`connect --discard-my-data` on the Secondary when resolving a split brain.)
        self.operator(false, Admin::DiscardMyData(resolving))?;
        let (me_p, me_s) = (self.pn.hello(), self.sn.hello());
        let ctx = |rc| HandshakeCtx {
            agreed_version: AGREED,
            wsame: true,
            resolve_conflicts: rc,
        };
        let (to_s, to_p) = (self.hello_read(&me_p)?, self.hello_read(&me_s)?);
        let ap = self.pn.agree(&me_p, &to_p, &ctx(rc_p), &pol_p)?;
        let as_ = self.sn.agree(&me_s, &to_s, &ctx(!rc_p), &pol_s)?;
        let (Some(hp), Some(hs)) = (&ap.handshake, &as_.handshake) else {
            return self.connected_diskless(ap.outcome, as_.outcome);
        };
        let what = || {
            format!(
                "primary {} {:?} ({}), secondary {} {:?} ({}); changes {} / {}, policy {:?}, \
                 primary holds RESOLVE_CONFLICTS: {rc_p}",
                me_p.uuids,
                ap.outcome,
                hp.comparison,
                me_s.uuids,
                as_.outcome,
                hs.comparison,
                me_p.dirty_bits,
                me_s.dirty_bits,
                pol_p
            )
        };
        #[cfg(test)]
        if self.trace {
            eprintln!("handshake: {}", what());
        }
        let decision = if split {
            self.judge_split_brain(
                hp,
                hs,
                resolving,
                &pol_p,
                me_p.dirty_bits,
                me_s.dirty_bits,
                rc_p,
            )
            .map_err(|e| format!("checker 8: {e}: {}", what()))?
        } else {
            match (ap.outcome, as_.outcome) {
                (HandshakeOutcome::Connected, HandshakeOutcome::Connected) => Decision::Connected,
                (
                    HandshakeOutcome::SyncSource { full: a },
                    HandshakeOutcome::SyncTarget { full: b },
                ) if a == b => Decision::Sync { full: a },
                _ => {
                    return Err(format!(
                        "handshake without a split brain did not make the primary SyncSource: {}",
                        what()
                    ))
                }
            }
        };
        self.check14_first_handshake(matches!(decision, Decision::Connected), &what)?;
        if let Decision::Refused { unrelated } = decision {
            self.report.sb_refused += 1;
            self.rs.sb = Sb::Refused {
                snap: self.sdisk.cache.clone(),
                unrelated,
            };
            self.reconnect_pending = true;
            let d = self.rs.rng.range(1, self.params.reconnect_delay);
            self.at(d, Ev::Reconnect);
            return Ok(());
        }
        let mine = |h: &Handshake| {
            h.comparison
                .correction
                .is_some_and(|c| c.side == UuidSide::Mine)
        };
        self.report.uuid_corrections += u64::from(mine(hp)) + u64::from(mine(hs));
        if resolving {
            // Until the Secondary is SyncTarget (a loss before `P_SYNC_UUID` leaves the
            // split brain in the UUIDs).
            self.rs.sb = Sb::Resolving;
        }
        self.connected(decision, as_.outcome)
    }

    /// A handshake that ran no sync handshake: only a Diskless Primary's (`p_detach.rs`),
    /// which DRBD connects at once (Connected on both sides).
    fn connected_diskless(
        &mut self,
        p: HandshakeOutcome,
        s: HandshakeOutcome,
    ) -> Result<(), String> {
        let both = (HandshakeOutcome::Connected, HandshakeOutcome::Connected);
        if self.pn.disk != DiskState::Diskless || (p, s) != both {
            return Err(format!(
                "no sync handshake ran ({p:?} / {s:?}) with the Primary's disk {}",
                self.pn.disk
            ));
        }
        self.connected(Decision::Connected, s)
    }

    /// A node's hello as the other node reads it: its `P_UUIDS` through the codec (the
    /// role and disk of its `P_STATE` as they are).
    fn hello_read(&self, hello: &HandshakeSide) -> Result<HandshakeSide, String> {
        let Packet::Uuids(u) = self.wire(&Packet::Uuids(hello.packet().into()), &[])? else {
            return Err("P_UUIDS decoded as another packet".into());
        };
        Ok(HandshakeSide::peer(&u.into(), hello.primary, hello.disk))
    }

    /// The handshake decided `decision` (not a refusal; `s_outcome`: the Secondary's
    /// agreement): both nodes are connected, and the SyncSource's bitmap goes first, or
    /// both reach Connected.
    fn connected(&mut self, decision: Decision, s_outcome: HandshakeOutcome) -> Result<(), String> {
        self.up = true;
        // Writes in flight before are the resync's now (their blocks are marked).
        self.fo.to_s.clear();
        // What each node learns of the other once its exchange is done, as the daemon's
        // connection does: the peer's role and disk from the handshake.
        let up = |peer: &Node| Up {
            version: AGREED,
            peer_role: peer.role,
            peer_disk: peer.disk,
            run: None,
            // Both nodes of the model have verify-alg (`verify.rs` runs one).
            peer_verify: true,
            tick: TickInput::default(),
        };
        self.rs.ups = Some((up(&self.sn), up(&self.pn)));
        match decision {
            Decision::Sync { full } => {
                self.fo.wf_sync = true;
                // The Secondary's run as its node chooses it (`Node::sync_role`: checksums
                // as the seed drew them, never after-crash-only here).
                let csums = self.rs.params.csums.is_some();
                self.rs.s_role =
                    self.sn
                        .sync_role(s_outcome, csums, false, self.pn.crashed_primary);
                if full {
                    self.report.full_resyncs += 1;
                    self.pn.exchange_bitmap(true);
                    self.sn.exchange_bitmap(true);
                    self.rs.s_only.mark_all();
                }
                let rx = |ctx: &WireCtx| -> Result<_, String> {
                    let r =
                        BitmapReceiver::new(SECTORS as u64 / 8, ctx).map_err(|e| e.to_string())?;
                    Ok((r, vec![0u64; SECTORS.div_ceil(8 * 64)]))
                };
                self.rs.s_rx = Some(rx(&self.rs.ctx)?);
                self.rs.p_rx = Some(rx(&self.rs.ctx)?);
                // WFBitMapS: the SyncSource sends its bitmap first. Its application
                // writes on, locally, until it replicates (`p_bitmap_packet`).
                self.rs.p_sent = self.pn.primary.out_of_sync().words().to_vec();
                for pkt in self.bitmap_packets(true)? {
                    self.send_data(DataMsg::Bitmap(pkt));
                }
            }
            // Both nodes reach Connected: no exchange.
            Decision::Connected => {
                self.up_node(true, None)?;
                self.up_node(false, None)?;
            }
            Decision::Refused { .. } => {}
        }
        Ok(())
    }

    /// Checker 8 at a handshake after a split brain: the decision is the one the policy
    /// table gives, both nodes agree on it, and the Primary never becomes SyncTarget.
    #[allow(clippy::too_many_arguments)]
    fn judge_split_brain(
        &self,
        hp: &Handshake,
        hs: &Handshake,
        resolving: bool,
        policy: &SplitBrainPolicy,
        cp: u64,
        cs: u64,
        rc_p: bool,
    ) -> Result<Decision, String> {
        let unrelated = matches!(
            (hp.outcome, hs.outcome),
            (
                HandshakeOutcome::Disconnect(DisconnectReason::UnrelatedData),
                HandshakeOutcome::Disconnect(DisconnectReason::UnrelatedData)
            )
        );
        if !unrelated && self.sn.disk == DiskState::Inconsistent {
            // DRBD: an Inconsistent disk makes its node SyncTarget whatever the UUIDs say
            // ("Becoming sync target due to disk states"): the split-brain writes of a
            // Secondary whose disk failed and was re-attached are discarded.
            return match (hp.outcome, hs.outcome) {
                (
                    HandshakeOutcome::SyncSource { full: a },
                    HandshakeOutcome::SyncTarget { full: b },
                ) if a == b => Ok(Decision::Sync { full: a }),
                _ => Err(
                    "the secondary is Inconsistent: the disk states must make it SyncTarget".into(),
                ),
            };
        }
        if !unrelated && (!hp.split_brain || !hs.split_brain) {
            return Err("the split brain was not detected".into());
        }
        let loser = if resolving {
            // discard-my-data on the Secondary.
            Some(Loser::Secondary)
        } else if hp.comparison.hg == 100 && hs.comparison.hg == 100 {
            // Rule 90 (the bitmap UUIDs match): the after-sb policies decide.
            expected_loser(policy, cp, cs, rc_p)
        } else {
            // Rule 100 (only the histories match: a resolved split brain whose resync
            // was cut before `P_SYNC_UUID`): without always-asbp nothing decides.
            None
        };
        use HandshakeOutcome as O;
        match (loser, hp.outcome, hs.outcome) {
            (
                Some(Loser::Secondary),
                O::SyncSource { full: false },
                O::SyncTarget { full: false },
            ) => Ok(Decision::Sync { full: false }),
            (
                Some(Loser::Primary),
                O::Disconnect(DisconnectReason::TargetPrimary),
                O::SyncSource { .. },
            )
            | (
                None,
                O::Disconnect(DisconnectReason::SplitBrain),
                O::Disconnect(DisconnectReason::SplitBrain),
            ) => Ok(Decision::Refused { unrelated: false }),
            // See `Sb::Recreated`.
            (
                _,
                O::Disconnect(DisconnectReason::UnrelatedData),
                O::Disconnect(DisconnectReason::UnrelatedData),
            ) => Ok(Decision::Refused { unrelated: true }),
            _ => Err(format!(
                "after the split brain the policy table expects {} to lose, the handshake decided \
                 otherwise",
                match loser {
                    None => "nobody (disconnect)",
                    Some(Loser::Primary) => "the primary (rr-conflict: disconnect)",
                    Some(Loser::Secondary) => "the secondary",
                }
            )),
        }
    }

    /// The packets of one bitmap transfer (the Primary's or the Secondary's bitmap),
    /// through the codec.
    fn bitmap_packets(&mut self, primary: bool) -> Result<Vec<Packet>, String> {
        let bm = if primary {
            self.pn.primary.out_of_sync()
        } else {
            self.sn.primary.out_of_sync()
        };
        let words = bm.words().to_vec();
        let bits = bm.blocks();
        let mut sender = BitmapSender::new(&words, bits, &self.rs.ctx, self.rs.params.use_rle)
            .map_err(|e| format!("bitmap sender: {e}"))?;
        let mut out = Vec::new();
        while let Some(pkt) = sender.next_packet() {
            out.push(self.wire(&pkt, &[])?);
        }
        self.report.bitmap_packets += out.len() as u64;
        Ok(out)
    }

    /// Encodes `pkt` (+ `data`) with the real codec and decodes it back, as the peer's
    /// receiver would.
    pub(super) fn wire(&self, pkt: &Packet, data: &[u8]) -> Result<Packet, String> {
        let mut buf = Vec::new();
        encode(pkt, &self.rs.ctx, 0, &mut buf).map_err(|e| format!("encode {pkt:?}: {e}"))?;
        buf.extend_from_slice(data);
        let f = decode_frame(&buf, &self.rs.ctx)
            .map_err(|e| format!("decode: {e}"))?
            .ok_or("decode: short frame")?;
        if f.len != buf.len() || f.data.len() != data.len() {
            return Err(format!("codec round trip of {pkt:?} lost bytes"));
        }
        Ok(f.packet)
    }

    /// One bitmap packet on the Secondary: OR-merged; at the end it sends its own.
    pub(super) fn s_bitmap_packet(&mut self, pkt: &Packet) -> Result<(), String> {
        let Some(words) = receive_bitmap(&mut self.rs.s_rx, pkt, "secondary")? else {
            return Ok(());
        };
        #[cfg(test)]
        let skip = self.rs.sabotage.skip_bitmap_merge;
        #[cfg(not(test))]
        let skip = false;
        if !skip {
            or_bits(self.sn.primary.out_of_sync_mut(), words.into_iter());
        }
        // WFBitMapT: the SyncTarget answers with its (merged) bitmap.
        for pkt in self.bitmap_packets(false)? {
            self.send_back(BackMsg::Bitmap(pkt));
        }
        Ok(())
    }

    /// A node's exchange is done (`primary`: the Primary's): the connection is up for it
    /// with `run` ([`Event::ConnectionUp`]: the run starts or it is Connected, and a
    /// Primary replicates from now on), as the daemon's `connection_up` does.
    fn up_node(&mut self, primary: bool, run: Option<RunStart>) -> Result<(), String> {
        let (p, s) = self.rs.ups.ok_or("a connection up without its handshake")?;
        let tick = self.tick_input(primary);
        let up = Up {
            run,
            tick,
            ..if primary { p } else { s }
        };
        self.node_step(primary, Event::ConnectionUp(up))?;
        self.pump(primary)
    }

    /// The Secondary's bitmap is in: the Primary merges it, tells the blocks it marked
    /// since it sent its own (`P_OUT_OF_SYNC`), sends `P_SYNC_UUID`, becomes SyncSource
    /// and replicates — the daemon's `connection_up` in one step.
    fn p_bitmap_packet(&mut self, pkt: &Packet) -> Result<(), String> {
        let Some(words) = receive_bitmap(&mut self.rs.p_rx, pkt, "primary")? else {
            return Ok(());
        };
        let known: Vec<u64> = (self.rs.p_sent.iter().zip(&words))
            .map(|(a, b)| a | b)
            .collect();
        or_bits(self.pn.primary.out_of_sync_mut(), words.into_iter());
        let r = uuid(&mut self.rs.rng);
        let (uuids, sync_uuid) = self.pn.begin_sync_source(r);
        self.pn.uuids = uuids;
        #[cfg(test)]
        let skip = self.rs.sabotage.skip_untold;
        #[cfg(not(test))]
        let skip = false;
        self.rs.p_at_sync = self.pn.primary.out_of_sync().words().to_vec();
        for pkt in self.pn.source_start(&known, sync_uuid) {
            match self.wire(&pkt, &[])? {
                Packet::SyncUuid(u) => self.send_data(DataMsg::SyncUuid(u)),
                _ if skip => {}
                pkt => {
                    self.report.exchange_told += 1;
                    self.send_data(DataMsg::OutOfSync(pkt));
                }
            }
        }
        let p = &self.rs.params;
        let cfg = SourceConfig {
            sectors: SECTORS as u64,
            thin: p.thin_granularity != 0,
            max_queue: p.source_queue,
            max_reads: p.source_reads,
            max_app_writes: 4096,
            c_min_rate: p.rate.c_min_rate,
        };
        self.up_node(true, Some(RunStart::Source(cfg)))
    }

    /// `P_OUT_OF_SYNC` before `P_SYNC_UUID` on the Secondary: its blocks join the
    /// bitmap the target will fetch (the daemon's `mark_told`).
    pub(super) fn s_out_of_sync(&mut self, pkt: &Packet) -> Result<(), String> {
        let Packet::BlockDesc { cmd, desc } = pkt else {
            return Err(format!("P_OUT_OF_SYNC decoded as {pkt:?}"));
        };
        if *cmd != Command::P_OUT_OF_SYNC || self.sn.runs.target_run().is_some() {
            return Err(format!("{cmd:?} on a SyncTarget or not P_OUT_OF_SYNC"));
        }
        self.sn
            .primary
            .out_of_sync_mut()
            .mark_checked(desc.sector, desc.blksize)
            .map_err(|e| format!("bad P_OUT_OF_SYNC {desc:?}: {e}"))
    }

    /// `P_SYNC_UUID` on the Secondary: it becomes SyncTarget over its merged bitmap.
    pub(super) fn start_target(&mut self, sync_uuid: u64) -> Result<(), String> {
        if self.rs.sb == Sb::Happened {
            self.report.sb_auto_resolved += 1;
        }
        if matches!(self.rs.sb, Sb::Happened | Sb::Resolving | Sb::Recreated) {
            self.rs.sb = Sb::Resolved;
        }
        self.fo.wf_sync = false;
        self.check13_target_start()?;
        let s_words = self.sn.primary.out_of_sync().words();
        let lacks = (self.rs.p_at_sync.iter().zip(s_words)).position(|(p, s)| p & !s != 0);
        if let Some(w) = lacks {
            return Err(format!(
                "checker 7: the SyncTarget starts without blocks the SyncSource marks (word \
                 {w}: source {:#x}, target {:#x})",
                self.rs.p_at_sync[w], s_words[w]
            ));
        }
        // The daemon's step 3: the merged bitmap on disk, then "not consistent" and the
        // sync UUID, before the first resync write.
        self.persist(false, &Node::sync_target_plan(sync_uuid))?;
        let bm = self.sn.primary.out_of_sync();
        self.report.resyncs += 1;
        self.report.out_of_sync_bytes = self.report.out_of_sync_bytes.max(bm.bytes());
        let p = &self.rs.params;
        let mut cfg = TargetConfig::new(SECTORS as u64);
        cfg.max_bio_size = p.max_bio_size;
        let Some(SyncRole::Target { csums }) = self.rs.s_role else {
            return Err(format!(
                "P_SYNC_UUID, but the secondary chose {:?}",
                self.rs.s_role
            ));
        };
        cfg.csums = csums;
        cfg.csums_max_bio_size = p.csums.unwrap_or(4096);
        cfg.thin_granularity = p.thin_granularity;
        cfg.rate = p.rate;
        cfg.max_requests = p.max_requests;
        self.up_node(false, Some(RunStart::Target(cfg)))?;
        let run = self
            .sn
            .runs
            .target_run()
            .ok_or("the target did not start")?;
        self.at(1, Ev::RsTick { run });
        self.maybe_schedule_s_stop();
        self.st_target_start()
    }

    pub(super) fn tick_input(&self, primary: bool) -> TickInput {
        TickInput {
            now_ms: self.now,
            app_io_sectors: if primary {
                self.rs.p_app_sectors
            } else {
                self.rs.s_app_sectors
            },
            app_waiting: false,
            congested: false,
        }
    }

    /// A controller step on both nodes while the target runs.
    pub(super) fn rs_tick(&mut self, run: u64) -> Result<(), String> {
        if self.sn.runs.target_run() != Some(run) || !self.up {
            return Ok(());
        }
        let (ts, tp) = (self.tick_input(false), self.tick_input(true));
        self.node_step(false, Event::SyncTick(ts))?;
        self.pump_secondary()?;
        self.node_step(true, Event::SyncTick(tp))?;
        self.pump_primary()?;
        if self.sn.runs.target_run() == Some(run) {
            self.at(SLEEP_TIME_MS, Ev::RsTick { run });
        }
        Ok(())
    }

    // ----- connection down ----------------------------------------------------------------

    /// Resync's part of a connection loss (`net`: both nodes live; else the Primary
    /// crashed): the runs end (held writes go), the streams are emptied, the UUID life
    /// cycle runs.
    pub(super) fn resync_connection_lost(&mut self, net: bool) -> Result<(), String> {
        self.fo.wf_sync = false;
        self.rs.back.clear();
        self.rs.fwd.clear();
        self.rs.back_parked = 0;
        self.rs.s_rx = None;
        self.rs.p_rx = None;
        if let Some(t) = self.sn.runs.target().filter(|_| !self.sn.runs.finishing()) {
            self.report.void_replies += t.progress(self.sn.primary.out_of_sync()).void_replies;
            self.report.resyncs_cut += 1;
        }
        // Both nodes' runs and cores, and the generation a Primary that loses its peer's
        // disk starts (`Event::ConnectionLost`); the Secondary's alone when the
        // Primary's died with its node.
        if net {
            let random = uuid(&mut self.rs.rng);
            self.node_step(true, Event::ConnectionLost { random })?;
            self.pump_primary()?;
        }
        let random = uuid(&mut self.rs.rng);
        self.node_step(false, Event::ConnectionLost { random })?;
        // The sabotaged Receiver forgot its held writes: so does the driver.
        #[cfg(test)]
        if self.sabotage.receiver.drop_held_at_loss {
            self.s_bufs.retain(|_, b| b.submitted);
        }
        self.pump_secondary()
    }

    /// The peer's `P_STATE`, through the codec, fed to a node (`primary`: the Primary's;
    /// [`Event::PeerState`], as `Volume::peer_state` does): on a Primary, a failed peer
    /// disk starts a generation the peer lacks; Connected ends a SyncSource's run.
    pub(super) fn peer_state(&mut self, primary: bool, pkt: &Packet) -> Result<(), String> {
        let Packet::State(word) = self.wire(pkt, &[])? else {
            return Err(format!("a P_STATE decoded as {pkt:?}"));
        };
        // The generation a lost peer disk starts: drawn for good only if one is, so a
        // `P_STATE` that starts none leaves the seed's stream as it was.
        let mut draw = self.rs.rng.clone();
        let random = uuid(&mut draw);
        self.node_step(primary, Event::PeerState { word, random })?;
        if self
            .actions
            .iter()
            .any(|a| matches!(a, Action::Persist { .. }))
        {
            self.rs.rng = draw;
        }
        self.pump(primary)
    }

    // ----- streams ----------------------------------------------------------------------

    fn send_back(&mut self, m: BackMsg) {
        let d = self.rs.rng.range(1, self.params.net_delay);
        self.rs.back_ready = self.rs.back_ready.max(self.now + d);
        self.rs.back.push_back(m);
        let (ready, gen) = (self.rs.back_ready, self.gen);
        self.at(ready - self.now, Ev::DeliverBack { gen });
    }

    fn send_fwd(&mut self, pkt: Packet) {
        let d = self.rs.rng.range(1, self.params.net_delay);
        self.rs.fwd_ready = self.rs.fwd_ready.max(self.now + d);
        self.rs.fwd.push_back(pkt);
        let (ready, gen) = (self.rs.fwd_ready, self.gen);
        self.at(ready - self.now, Ev::DeliverFwd { gen });
    }

    /// The Secondary→Primary data stream: its bitmap, resync requests (not read off the
    /// socket while the SyncSource's queue is full).
    pub(super) fn deliver_back(&mut self, gen: u64) -> Result<(), String> {
        if gen != self.gen {
            return Ok(());
        }
        match self.rs.back.pop_front() {
            None => Err("back stream delivery with nothing queued".into()),
            Some(BackMsg::Bitmap(pkt)) => self.p_bitmap_packet(&pkt),
            Some(BackMsg::Rs(pkt)) => {
                let inbound = match Inbound::from_packet(&pkt).map_err(|e| e.to_string())? {
                    Some(i @ Inbound::RsRequest { .. }) => i,
                    other => return Err(format!("SyncSource got {other:?} on the data stream")),
                };
                let tick = self.tick_input(true);
                if self.node_step(true, Event::SyncPacket { inbound, tick })? == Outcome::Full {
                    // Not read off the socket while the source's queue is full (as the
                    // daemon): delivered again once it has room (`pump_primary`).
                    self.rs.back.push_front(BackMsg::Rs(pkt));
                    self.rs.back_parked += 1;
                    return Ok(());
                }
                self.pump_primary()
            }
        }
    }

    /// The Primary→Secondary meta stream: answers without data.
    pub(super) fn deliver_fwd(&mut self, gen: u64) -> Result<(), String> {
        if gen != self.gen {
            return Ok(());
        }
        let pkt = self
            .rs
            .fwd
            .pop_front()
            .ok_or("meta stream delivery with nothing queued")?;
        if self.sn.runs.target().is_none() {
            return Err("resync answer with no SyncTarget".into());
        }
        let inbound = match Inbound::from_packet(&pkt).map_err(|e| e.to_string())? {
            Some(i @ Inbound::RsIsInSync { .. }) => {
                self.report.rs_in_sync += 1;
                i
            }
            Some(i @ Inbound::NegRsDReply { .. }) => i,
            other => return Err(format!("SyncTarget got {other:?} on the meta stream")),
        };
        let tick = self.tick_input(false);
        self.node_step(false, Event::SyncPacket { inbound, tick })?;
        self.pump_secondary()
    }

    /// `P_RS_DATA_REPLY` / `P_RS_DEALLOCATED` on the Secondary's data stream.
    pub(super) fn target_reply(
        &mut self,
        pkt: &Packet,
        data: Vec<u8>,
        vers: Vec<u64>,
    ) -> Result<(), String> {
        if self.sn.runs.target().is_none() {
            return Err("resync reply with no SyncTarget".into());
        }
        match Inbound::from_packet(pkt).map_err(|e| e.to_string())? {
            Some(Inbound::RsDataReply { sector, len }) => {
                let write = self.node_step(false, Event::SyncDataReply { sector, len })?;
                if let Outcome::SyncWrite { run, tag } = write {
                    self.report.rs_bytes += u64::from(len);
                    self.s_rs_write((run, tag, sector), Some(data), vers);
                }
            }
            Some(i @ Inbound::RsDeallocated { .. }) => {
                self.report.rs_deallocated += 1;
                self.rs.zero_vers = Some(vers);
                let tick = self.tick_input(false);
                self.node_step(false, Event::SyncPacket { inbound: i, tick })?;
            }
            other => return Err(format!("SyncTarget got {other:?} on the data stream")),
        }
        self.pump_secondary()
    }

    /// `P_RS_WRITE_ACK` / `P_NEG_ACK` (ID_SYNCER) on the Primary's meta stream.
    pub(super) fn source_meta(&mut self, pkt: &Packet) -> Result<(), String> {
        if self.pn.runs.source().is_none() {
            return Err("resync ack with no SyncSource".into());
        }
        let inbound = match Inbound::from_packet(pkt).map_err(|e| e.to_string())? {
            Some(i @ (Inbound::RsWriteAck { .. } | Inbound::RsNegAck { .. })) => i,
            other => return Err(format!("SyncSource got {other:?} on the meta stream")),
        };
        let tick = self.tick_input(true);
        self.node_step(true, Event::SyncPacket { inbound, tick })?;
        self.pump_primary()
    }

    /// The SyncTarget finished and is UpToDate (its `P_STATE`: Secondary, UpToDate,
    /// Connected): the SyncSource finishes too.
    pub(super) fn sync_done(&mut self, pkt: &Packet) -> Result<(), String> {
        if self.pn.conn != ConnState::SyncSource {
            return Err(format!("the end of a resync on a {} Primary", self.pn.conn));
        }
        self.peer_state(true, pkt)?;
        if self.pn.conn != ConnState::Connected {
            return Err(format!(
                "the end of a resync left the Primary {}",
                self.pn.conn
            ));
        }
        Ok(())
    }

    /// The Primary's node ended its SyncSource run ([`Action::SourceEnded`]). Complete
    /// (the Secondary said UpToDate): every block it marks was fetched (checker 7), and
    /// its generation is made durable. Incomplete (the Secondary's disk failed): its
    /// blocks stay marked.
    pub(super) fn source_ended(&mut self, end: &SourceEnd) -> Result<(), String> {
        if end.uuids.is_none() {
            self.report.source_ends_incomplete += 1;
            return Ok(());
        }
        if end.unfetched > 0 {
            return Err(format!(
                "checker 7: the SyncTarget ended UpToDate without {} blocks the SyncSource \
                 marks (no failed local write explains them)",
                end.unfetched
            ));
        }
        self.persist(true, &[Durable::Superblock(end.durable())])?;
        Ok(())
    }

    // ----- the SyncSource ---------------------------------------------------------------

    /// Performs an action of the Primary's runs (it is only ever SyncSource).
    pub(super) fn source_action(&mut self, a: Action) -> Result<(), String> {
        match a {
            Action::SendSync { pkt, .. } if !self.up => {
                return Err(format!("SyncSource sent {pkt:?} while disconnected"));
            }
            Action::SendSync {
                pkt,
                reply: Some(tag),
                ..
            } => {
                let (sector, data, vers) = self
                    .rs
                    .p_reads
                    .remove(&tag)
                    .ok_or("data reply without a read buffer")?;
                #[cfg(test)]
                if self.rs.sabotage.source_claims_in_sync {
                    let len = u32::try_from(data.len()).map_err(|e| e.to_string())?;
                    let (runs, bm) = self.pn.runs_and_bitmap();
                    runs.set_in_sync(bm, sector, len);
                    let lie = crate::resync::SourceOutput::SendRsIsInSync { sector, len };
                    let pkt = self.wire(&lie.packet().ok_or("no packet")?, &[])?;
                    self.send_fwd(pkt);
                    return Ok(());
                }
                let _ = sector;
                let pkt = self.wire(&pkt, &data)?;
                self.send_data(DataMsg::Rs { pkt, data, vers });
            }
            Action::SendSync {
                stream: Stream::Meta,
                pkt,
                ..
            } => {
                let pkt = self.wire(&pkt, &[])?;
                self.send_fwd(pkt);
            }
            Action::SendSync { pkt, .. } => {
                // `P_RS_DEALLOCATED`, answering the read being handled.
                let vers = self
                    .rs
                    .read_ctx
                    .clone()
                    .ok_or("P_RS_DEALLOCATED outside a read")?;
                let pkt = self.wire(&pkt, &[])?;
                self.send_data(DataMsg::Rs {
                    pkt,
                    data: Vec::new(),
                    vers,
                });
            }
            Action::SyncRead(RunRead {
                run,
                tag,
                sector,
                len,
                purpose: ReadFor::Source { digest, zero_check },
            }) => {
                let fail = self.rs.rng.chance(self.rs.params.read_fail_ppm);
                let d = self.rs.rng.range(1, self.params.disk_delay.0);
                let inc = self.inc;
                self.at(
                    d,
                    Ev::PRead(Box::new(ReadEv {
                        tag,
                        sector,
                        len,
                        digest,
                        zero_check,
                        fail,
                        inc,
                        run,
                    })),
                );
            }
            other => return Err(format!("unexpected action of the SyncSource: {other:?}")),
        }
        Ok(())
    }

    /// After the Primary's actions: requests parked while the source's queue was full
    /// are delivered again once it has room.
    pub(super) fn unpark_requests(&mut self) {
        if self.rs.back_parked > 0 && self.pn.runs.source_can_accept() {
            let gen = self.gen;
            for _ in 0..std::mem::take(&mut self.rs.back_parked) {
                self.at(0, Ev::DeliverBack { gen });
            }
        }
    }

    /// A SyncSource read of the Primary's disk completed.
    pub(super) fn source_read_done(&mut self, r: &ReadEv) -> Result<(), String> {
        let &ReadEv {
            tag,
            sector,
            len,
            digest,
            zero_check,
            fail,
            run,
            ..
        } = r;
        let first = usize::try_from(sector).map_err(|e| e.to_string())?;
        let n = len as usize / SECTOR as usize;
        let data =
            self.pdisk.cache[first * SECTOR as usize..(first + n) * SECTOR as usize].to_vec();
        let vers = self.pdisk.cache_ver[first..first + n].to_vec();
        let outcome = if fail {
            ReadOutcome::Failed
        } else {
            ReadOutcome::Ok {
                all_zero: zero_check && data.iter().all(|&b| b == 0),
                digest: digest.then(|| Digest::of(&data)),
            }
        };
        self.rs.read_ctx = Some(vers.clone());
        self.rs.p_reads.insert(tag, (sector, data, vers));
        let purpose = ReadFor::Source { digest, zero_check };
        self.run_read_done(true, (run, tag, purpose), outcome)?;
        self.rs.p_reads.remove(&tag);
        self.rs.read_ctx = None;
        Ok(())
    }

    /// The restarted Primary's node: a new node over its core (which loaded the bitmap
    /// attach read), Secondary and not connected as the daemon starts, with the
    /// crashed-Primary flag the attach found (`crashed`: set after a crash; after a clean
    /// stop, the one not yet repaired), then promoted alone by the operator (a new
    /// current UUID unless a bitmap UUID is set).
    pub(super) fn primary_restarted(
        &mut self,
        primary: Primary,
        crashed: bool,
    ) -> Result<(), String> {
        let receiver = self.params.receiver()?;
        let mut node = Node::new(primary, receiver, self.pn.uuids, self.pn.disk);
        node.crashed_primary = crashed;
        #[cfg(test)]
        {
            node.runs.failed_mut().sabotage_ack_clears = self.sabotage.ack_clears_failed_blocks;
        }
        promote_alone(&mut node, &mut self.rs.rng, &mut self.actions)
            .map_err(|e| format!("restarted primary: {e}"))?;
        self.pn = node;
        Ok(())
    }

    /// Power loss of the Primary's node: its resync state is gone with it (the runs start
    /// afresh; the reads and writes in flight never complete).
    pub(super) fn primary_crashed(&mut self) {
        self.pn.runs = SyncRuns::default();
        #[cfg(test)]
        {
            self.pn.runs.failed_mut().sabotage_ack_clears = self.sabotage.ack_clears_failed_blocks;
        }
        self.rs.forget_primary_io();
    }

    /// The Primary's write of `len` bytes is submitted to its disk (c-min-rate).
    pub(super) fn primary_write_submitted(&mut self, len: u32) {
        self.rs.p_app_sectors += u64::from(len / SECTOR);
    }

    // ----- the SyncTarget ---------------------------------------------------------------

    /// Performs an action of the Secondary's runs (it is only ever SyncTarget).
    pub(super) fn target_action(&mut self, a: Action) -> Result<(), String> {
        match a {
            Action::SendSync { pkt, .. } if !self.up => {
                return Err(format!("SyncTarget sent {pkt:?} while disconnected"));
            }
            Action::SendSync {
                stream: Stream::Resync,
                pkt,
                ..
            } => {
                self.report.rs_requests += 1;
                let pkt = self.wire(&pkt, &[])?;
                self.send_back(BackMsg::Rs(pkt));
            }
            Action::SendSync { pkt, .. } => {
                let pkt = self.wire(&pkt, &[])?;
                self.send_meta(MetaMsg::Rs(pkt))?;
            }
            Action::SyncRead(RunRead {
                run,
                tag,
                sector,
                len,
                purpose: ReadFor::TargetDigest,
            }) => {
                let fail = self.rs.rng.chance(self.rs.params.read_fail_ppm);
                let d = self.rs.rng.range(1, self.params.disk_delay.0);
                self.at(
                    d,
                    Ev::SRead {
                        tag,
                        sector,
                        len,
                        fail,
                        run,
                    },
                );
            }
            Action::SyncZeroes {
                run,
                tag,
                sector,
                len,
            } => {
                let vers = self
                    .rs
                    .zero_vers
                    .take()
                    .ok_or("WriteZeroes outside P_RS_DEALLOCATED")?;
                if vers.len() != len as usize / SECTOR as usize {
                    return Err("WriteZeroes of another size than the reply".into());
                }
                self.s_rs_write((run, tag, sector), None, vers);
            }
            Action::BitmapWriteBack => self.s_write_back(),
            Action::TargetFinished {
                run,
                summary,
                adopt,
            } => self.target_finished(run, &summary, adopt),
            other => return Err(format!("unexpected action of the SyncTarget: {other:?}")),
        }
        Ok(())
    }

    /// A resync write of the Secondary's target (`data`: `None` for zeroes), drawn: it
    /// may fail, and lands after a disk delay.
    fn s_rs_write(
        &mut self,
        (run, tag, sector): (u64, u64, u64),
        data: Option<Vec<u8>>,
        vers: Vec<u64>,
    ) {
        let fail = self.rs.rng.chance(self.params.fail_ppm[2]);
        let d = self.rs.rng.range(1, self.params.disk_delay.0);
        let w = RsWriteEv {
            tag,
            sector,
            data,
            vers,
            fail,
            run,
        };
        self.at(d, Ev::SRsWrite(Box::new(w)));
    }

    /// After the Secondary's actions: the target's requests in flight stay within its
    /// bound.
    pub(super) fn check_target_requests(&self) -> Result<(), String> {
        if let Some(t) = self.sn.runs.target() {
            let in_flight = t.requests_in_flight();
            if in_flight > self.rs.params.max_requests {
                return Err(format!("target has {in_flight} requests in flight"));
            }
        }
        Ok(())
    }

    /// The target finished: with nothing left, the Secondary's data is made durable
    /// before the disk is declared UpToDate (`finish_flush_done`); otherwise the disk
    /// stays Inconsistent with the failed blocks set, and the run is over at once.
    fn target_finished(&mut self, run: u64, sum: &ResyncSummary, adopt: Option<UuidSet>) {
        if let Some(t) = self.sn.runs.target() {
            self.report.void_replies += t.progress(self.sn.primary.out_of_sync()).void_replies;
        }
        let end = self.sn.target_end(run, adopt);
        match adopt {
            Some(_) => {
                self.report.resyncs_done += 1;
                self.rs.s_finish = Some(end);
                let id = self.sn.primary.out_of_sync_mut().begin_flush();
                let covers = self.sdisk.completions;
                let fail = self.rs.rng.chance(self.params.fail_ppm[3]);
                let d = self.rs.rng.range(1, self.params.disk_delay.1);
                let gen = self.gen;
                self.at(
                    d,
                    Ev::SFinishFlush {
                        covers,
                        fail,
                        gen,
                        id,
                    },
                );
            }
            None => {
                debug_assert!(sum.left_blocks > 0);
                self.report.resyncs_failed += 1;
                self.sn.target_end_recorded(&end, false);
            }
        }
    }

    pub(super) fn finish_flush_done(
        &mut self,
        covers: u64,
        fail: bool,
        gen: u64,
        id: Option<u64>,
    ) -> Result<(), String> {
        let end = self.rs.s_finish.take().ok_or("finish flush of no run")?;
        // The plan's first step is this flush (an event of its own here: it takes time
        // and may fail); the rest follows at once.
        let plan = Node::target_end_plan(end);
        if plan.first() != Some(&Durable::FlushData) {
            return Err(format!("the end of a run flushes first: {plan:?}"));
        }
        if !fail {
            self.sdisk.flush(covers);
        }
        if let Some(id) = id {
            self.sn.primary.out_of_sync_mut().flush_done(id, !fail);
        }
        if fail || self.sn.disk == DiskState::Failed {
            // Stays Inconsistent (the next handshake resyncs again) or Failed (detached).
            self.sn.target_end_recorded(&end, false);
            return Ok(());
        }
        // The run's clears on disk, then its UUIDs.
        let durable = self.persist(false, &plan[1..])? && end.uuids.is_some();
        self.sn.target_end_recorded(&end, durable);
        if !durable {
            return Ok(());
        }
        self.s_consistent_again();
        if self.up && gen == self.gen {
            if self.sn.disk != DiskState::UpToDate || self.sn.conn != ConnState::Connected {
                return Err(format!(
                    "a SyncTarget ended {} / {}, not UpToDate / Connected",
                    self.sn.disk, self.sn.conn
                ));
            }
            let pkt = self
                .sn
                .state_packet()
                .ok_or("a SyncTarget with no P_STATE to send")?;
            self.send_meta(MetaMsg::SyncDone(pkt))?;
        }
        Ok(())
    }

    pub(super) fn target_digest_done(
        &mut self,
        tag: u64,
        sector: u64,
        len: u32,
        fail: bool,
        run: u64,
    ) -> Result<(), String> {
        let first = usize::try_from(sector).map_err(|e| e.to_string())? * SECTOR as usize;
        let outcome = if fail {
            ReadOutcome::Failed
        } else {
            ReadOutcome::Ok {
                all_zero: false,
                digest: Some(Digest::of(&self.sdisk.cache[first..first + len as usize])),
            }
        };
        self.run_read_done(false, (run, tag, ReadFor::TargetDigest), outcome)
    }

    /// A run's read on a node (`primary`: the Primary's) ended: its step
    /// ([`Event::SyncReadDone`]) and the actions that follow.
    fn run_read_done(
        &mut self,
        primary: bool,
        (run, tag, purpose): (u64, u64, ReadFor),
        outcome: ReadOutcome,
    ) -> Result<(), String> {
        let done = Event::SyncReadDone {
            run,
            tag,
            purpose,
            outcome,
        };
        self.node_step(primary, done)?;
        self.pump(primary)
    }

    /// Performs a node's actions (`primary`: the Primary's).
    fn pump(&mut self, primary: bool) -> Result<(), String> {
        if primary {
            self.pump_primary()
        } else {
            self.pump_secondary()
        }
    }

    /// A resync write landed on the Secondary's disk. Checker 7, during the run: it
    /// never puts an older version of a sector over a newer one.
    pub(super) fn target_write_done(&mut self, w: RsWriteEv) -> Result<(), String> {
        let RsWriteEv {
            tag,
            sector,
            data,
            vers,
            fail,
            run,
        } = w;
        let vers = &vers[..];
        let first = usize::try_from(sector).map_err(|e| e.to_string())?;
        if !fail {
            for (s, &v) in (first..).zip(vers) {
                let cur = self.sdisk.cache_ver[s];
                if v < cur && !self.rs.s_disc[s] {
                    return Err(format!(
                        "checker 7: a resync write put version {v} over version {cur} at secondary \
                         sector {s} (older data over newer)"
                    ));
                }
            }
        }
        self.sdisk.complete_copy(first, data.as_deref(), vers, fail);
        if !fail {
            for d in &mut self.rs.s_disc[first..first + vers.len()] {
                *d = false;
            }
        }
        self.node_step(
            false,
            Event::SyncWriteDone {
                run,
                tag,
                ok: !fail,
            },
        )?;
        self.pump_secondary()
    }

    /// The Secondary's disk write of a replicated write, as the node's drain (or a
    /// release of the target) asks for it: it matches what the Primary sent, once.
    pub(super) fn peer_local_write(&mut self, w: LocalWrite) -> Result<(), String> {
        let Side::Peer { token } = w.side else {
            return Err(format!(
                "the Secondary's node wrote for its Primary core: {w:?}"
            ));
        };
        let b = self
            .s_bufs
            .get_mut(&token)
            .ok_or_else(|| format!("secondary submitted unknown token {token:#x}"))?;
        let pw = b.w;
        let same = (pw.sector, pw.len, pw.kind, pw.dp_flags & dp::DP_FUA != 0)
            == (w.sector, w.len, w.kind, w.fua);
        if !same || b.submitted {
            return Err(format!("secondary write {token:#x} does not match {w:?}"));
        }
        b.submitted = true;
        self.rs.s_app_sectors += u64::from(w.len / SECTOR);
        self.submit_peer_write(token);
        Ok(())
    }

    /// A replicated write landed on the Secondary's disk; the node learns it. (A failed
    /// one is the node's `Event::WriteFailed`: `Sim::secondary_write_failed`.)
    pub(super) fn peer_write_landed(&mut self, token: u64, b: &SBuf) -> Result<(), String> {
        let first = usize::try_from(b.w.sector).map_err(|e| e.to_string())?;
        let n = b.w.len as usize / SECTOR as usize;
        for d in &mut self.rs.s_disc[first..first + n] {
            *d = false;
        }
        let w = b.local_write(token);
        self.node_step(false, Event::WriteDone { w, ok: true })?;
        self.pump_secondary()
    }

    // ----- split brain ------------------------------------------------------------------

    pub(super) fn maybe_schedule_split_brain(&mut self) {
        if self.rs.sb == Sb::NotYet
            && self
                .rs
                .params
                .split_brain_after_ops
                .is_some_and(|k| self.issued >= k)
        {
            self.rs.sb = Sb::Scheduled;
            let d = self.rs.rng.range(0, 300);
            self.at(d, Ev::SbFault);
        }
    }

    /// The split-brain fault, at a moment the replicas are in sync (same generation, no
    /// bitmap UUID, the Secondary UpToDate): the connection drops, and the Secondary is
    /// promoted on its own and written.
    pub(super) fn sb_fault(&mut self) -> Result<(), String> {
        if self.rs.sb != Sb::Scheduled {
            return Ok(());
        }
        let (p, s) = (&self.pn.uuids, &self.sn.uuids);
        let eligible = self.up
            && !self.primary_down
            && self.check6.is_none()
            && p.bitmap == 0
            && s.bitmap == 0
            && p.current & !1 == s.current & !1
            && self.sn.disk == DiskState::UpToDate
            && self.sn.runs.target().is_none()
            && !self.sn.runs.finishing()
            // The operator's `primary` is refused while peer writes are on the disk.
            && !self.s_writes_pending();
        if !eligible {
            if !self.workload_done() && !self.fo.dead {
                let d = self.rs.rng.range(20, 200);
                self.at(d, Ev::SbFault);
            }
            return Ok(());
        }
        self.drop_connection()?;
        self.report.split_brains += 1;
        let old = self.sn.uuids;
        #[cfg(test)]
        let keep = self.rs.sabotage.promote_keeps_uuid;
        #[cfg(not(test))]
        let keep = false;
        if keep {
            self.sn.uuids.current |= 1;
            self.sn.role = Role::Primary;
        } else {
            promote_alone(&mut self.sn, &mut self.rs.rng, &mut self.actions)
                .map_err(|e| format!("split brain: the lone Secondary: {e}"))?;
            if self.sn.uuids.current & !1 == old.current & !1 {
                return Err("the Secondary promoted without its peer made no new UUID".into());
            }
        }
        let n = self.rs.params.split_brain_writes;
        self.rs.sb = Sb::Writing { left: n };
        for i in 0..n {
            let d = self.rs.rng.range(1, 200);
            self.at(d, Ev::SbWrite { n: i });
        }
        Ok(())
    }

    /// One write of the promoted Secondary's application: on its disk, in its bitmap.
    pub(super) fn sb_write(&mut self, n: u64) -> Result<(), String> {
        let Sb::Writing { left } = self.rs.sb else {
            return Err("split-brain write outside the split brain".into());
        };
        let sectors = self.rs.rng.range(1, 16);
        let sector = self.rs.rng.below(SECTORS as u64 - sectors + 1);
        let len = u32::try_from(sectors).map_err(|e| e.to_string())? * SECTOR;
        let id = SB_ID | n;
        let data = pattern(id, sector, len);
        let first = usize::try_from(sector).map_err(|e| e.to_string())?;
        self.sdisk
            .complete_write(first, Some(&data), len as usize, id, false, false);
        self.sn.primary.out_of_sync_mut().mark(sector, len);
        self.rs.s_only.mark(sector, len);
        for d in &mut self.rs.s_disc[first..first + len as usize / SECTOR as usize] {
            *d = true;
        }
        self.rs.sb = if left > 1 {
            Sb::Writing { left: left - 1 }
        } else {
            // The operator's `secondary`, by the node's events and plan.
            let (plan, then) = super::roles::demote(&mut self.sn, &mut self.actions)
                .map_err(|e| format!("split brain: {e}"))?;
            self.pump_secondary()?;
            let ok = self.persist(false, &plan)?;
            super::roles::demoted(&mut self.sn, then, ok, &mut self.actions)?;
            self.pump_secondary()?;
            Sb::Happened
        };
        Ok(())
    }

    // ----- checkers -----------------------------------------------------------------------

    /// Resync bounds, and the mirror of the Primary core's bitmap.
    pub(super) fn check_resync_bounds(&self) -> Result<(), String> {
        // (The SyncTarget's bound is checked where its requests change, in `pump_target`.)
        if self.pn.runs.untracked() + self.sn.runs.untracked() != 0 {
            return Err("a resync machine could not track an application write".into());
        }
        if let Some(src) = self.pn.runs.source() {
            let st = src.stats();
            if st.queued + st.reading > self.rs.params.source_queue
                || st.reading > self.rs.params.source_reads
            {
                return Err(format!("source exceeded its bounds: {st:?}"));
            }
        }
        Ok(())
    }

    /// Why the replicas are not in sync now, if they are not: connected, no exchange or
    /// resync running, the Secondary UpToDate, both bitmaps empty, the same UUIDs.
    pub(super) fn not_in_sync(&self) -> Option<String> {
        let (p, s) = (&self.pn.uuids, &self.sn.uuids);
        Some(if !self.up {
            "connection down".into()
        } else if self.rs.p_rx.is_some() || self.rs.s_rx.is_some() {
            "bitmap exchange unfinished".into()
        } else if self.sn.runs.target().is_some() || self.sn.runs.finishing() {
            "resync unfinished".into()
        } else if self.sn.disk != DiskState::UpToDate {
            "the secondary is Inconsistent (its last resync failed)".into()
        } else if self.pn.primary.out_of_sync().count() + self.sn.primary.out_of_sync().count() != 0
        {
            format!(
                "bitmaps not empty: primary {} bits, secondary {} bits",
                self.pn.primary.out_of_sync().count(),
                self.sn.primary.out_of_sync().count()
            )
        } else if [p.current, p.bitmap, p.history[0], p.history[1]]
            .iter()
            .zip([s.current, s.bitmap, s.history[0], s.history[1]])
            .any(|(&a, b)| a & !1 != b & !1)
        {
            format!("UUIDs differ: primary {p}, secondary {s}")
        } else {
            return None;
        })
    }

    /// Checkers 3 and 7 at quiescence: in sync, every block byte-identical on both disks
    /// and durable on the Secondary.
    pub(super) fn check_in_sync(&self) -> Result<(), String> {
        if let Some(why) = self.not_in_sync() {
            return Err(format!("checker 7: not in sync at the end: {why}"));
        }
        // Each node's own view (`replica::Node`'s transitions at a run's start and end).
        for (who, n) in [("primary", &self.pn), ("secondary", &self.sn)] {
            if n.conn != ConnState::Connected || n.peer_disk != DiskState::UpToDate {
                return Err(format!(
                    "checker 7: in sync, but the {who} node says {} with a {} peer disk",
                    n.conn, n.peer_disk
                ));
            }
        }
        let block = SECTORS_PER_BLOCK * SECTOR as usize;
        if self.pdisk.cache != self.sdisk.cache {
            let b = (0..SECTORS / SECTORS_PER_BLOCK)
                .find(|&b| {
                    self.pdisk.cache[b * block..(b + 1) * block]
                        != self.sdisk.cache[b * block..(b + 1) * block]
                })
                .unwrap_or(0);
            let sec = (b * SECTORS_PER_BLOCK..(b + 1) * SECTORS_PER_BLOCK)
                .find(|&s| self.pdisk.cache_sector(s) != self.sdisk.cache_sector(s))
                .unwrap_or(b * SECTORS_PER_BLOCK);
            return Err(format!(
                "checker 7: block {b} differs with both bitmaps empty: sector {sec} primary \
                 version {}, secondary version {}",
                self.pdisk.cache_ver[sec], self.sdisk.cache_ver[sec]
            ));
        }
        if self.sdisk.durable != self.sdisk.cache {
            let sec = (0..SECTORS)
                .find(|&s| self.sdisk.durable_sector(s) != self.sdisk.cache_sector(s))
                .unwrap_or(0);
            return Err(format!(
                "checker 3: sector {sec} is in sync but not durable on the secondary: durable \
                 version {}, cached {}",
                self.sdisk.durable_ver[sec], self.sdisk.cache_ver[sec]
            ));
        }
        Ok(())
    }
}

/// One bitmap packet into a node's receiving transfer; the merged words once it is
/// complete (the transfer then ends).
fn receive_bitmap(
    slot: &mut Option<(BitmapReceiver, Vec<u64>)>,
    pkt: &Packet,
    who: &str,
) -> Result<Option<Vec<u64>>, String> {
    let (rx, words) = slot
        .as_mut()
        .ok_or("bitmap packet outside a bitmap exchange")?;
    let done = rx
        .receive_packet(words, pkt)
        .map_err(|e| format!("{who} bitmap receive: {e}"))?;
    if !done {
        return Ok(None);
    }
    Ok(slot.take().map(|(_, words)| words))
}
