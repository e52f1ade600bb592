//! Checker 10: concurrent promotion requests (`state::change`), a small sub-simulation
//! run [`ROUNDS`] times on every seed, from its own random stream.
//!
//! Two connected Secondaries, A and B; exactly one holds `RESOLVE_CONFLICTS` (drawn).
//! Each is told `primary` at a random moment within a few network delays of the other
//! (so the requests often cross). A node applies the daemon's local rules
//! (`Volume::promote` / `promotion_refusal`): it refuses when it knows its peer is
//! Primary, when its disk is not UpToDate (drawn Inconsistent on about a fifth of the
//! nodes), or while a request of its own is pending; otherwise it sends
//! `P_STATE_CHG_REQ` with [`promote_request`] (through the real codec) and waits. The
//! receiver answers with the real [`decide`] (its `own_request_pending`, its
//! `resolve_conflicts`); a grant makes it record the peer's role and disk. A success
//! reply for the same connection makes the requester re-check its local rules and
//! become Primary (then it sends `P_STATE`); a grant it cannot use makes it send
//! `P_STATE` (still Secondary), as the daemon does. A node refused with
//! `SS_CONCURRENT_ST_CHG` retries once on about half of the rounds. Each direction is
//! one ordered stream with random delays; on about a third of the rounds the connection
//! drops at a random moment: what is in flight is lost, a pending request fails, the
//! peer's role becomes unknown, and nobody is told `primary` again (a node that lost its
//! peer and promotes alone is a split brain, checker 8's subject: tandem has no fencing).
//!
//! Checked after every event: never two Primaries; at most one request granted per
//! round; a node becomes Primary only on a success reply of the current connection and
//! with an UpToDate disk. At the end of a round without a drop in which at least one
//! node is UpToDate: exactly one Primary (someone wins the race). Bounds: at most
//! 6 messages in flight, 16 events a round.

use super::rng::Rng;
use crate::state::change::{decide, promote_request, Local, StateRv};
use crate::state::{ConnState, DiskState, Role};
use crate::wire::{decode_frame, encode, ff, Command, Packet, ReqState, WireCtx};

/// Rounds per seed.
pub(super) const ROUNDS: u32 = 8;
/// Events per round before it counts as stuck.
const MAX_EVENTS: u32 = 16;

/// What the rounds of one seed did.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RaceStats {
    pub rounds: u64,
    /// Rounds where both requests were pending at once.
    pub crossing: u64,
    /// Requests refused with `SS_CONCURRENT_ST_CHG`.
    pub concurrent_refusals: u64,
    /// Requests refused by the peer for another reason.
    pub peer_refusals: u64,
    /// Promotions refused by a node's own rules.
    pub local_refusals: u64,
    /// Requests lost with a connection drop.
    pub dropped: u64,
    /// Nodes that became Primary.
    pub promoted: u64,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    role: Role,
    disk: DiskState,
    peer_role: Role,
    peer_disk: DiskState,
    /// The connection generation of its pending request.
    own: Option<u64>,
    resolve: bool,
    retried: bool,
}

#[derive(Debug, Clone, Copy)]
enum Msg {
    Req { mask: u32, val: u32 },
    Reply(i32),
    State(Role),
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    Cmd(usize),
    /// A message to node `to` of connection `gen`.
    Deliver {
        to: usize,
        gen: u64,
        msg: Msg,
    },
    Drop,
}

struct Round<'a> {
    rng: &'a mut Rng,
    ctx: WireCtx,
    nodes: [Node; 2],
    up: bool,
    gen: u64,
    now: u64,
    /// Per direction (to node 0, to node 1): when its last message arrives.
    ready: [u64; 2],
    events: Vec<(u64, u64, Ev)>,
    seq: u64,
    granted: u32,
    in_flight: usize,
    stats: RaceStats,
    sabotage_resolver: bool,
    /// Largest network delay of the round.
    delay_max: u64,
}

/// Runs the rounds of one seed; `sabotage_resolver`: the conflict resolver does not
/// refuse while its own request is pending.
pub(super) fn run_rounds(rng: &mut Rng, sabotage_resolver: bool) -> Result<RaceStats, String> {
    let ctx = WireCtx::new(101, ff::PRO_FEATURES_84).map_err(|e| e.to_string())?;
    let mut total = RaceStats::default();
    for r in 0..ROUNDS {
        let s = round(rng, ctx, sabotage_resolver)
            .map_err(|e| format!("checker 10 (promotion race, round {r}): {e}"))?;
        total.rounds += s.rounds;
        total.crossing += s.crossing;
        total.concurrent_refusals += s.concurrent_refusals;
        total.peer_refusals += s.peer_refusals;
        total.local_refusals += s.local_refusals;
        total.dropped += s.dropped;
        total.promoted += s.promoted;
    }
    Ok(total)
}

fn round(rng: &mut Rng, ctx: WireCtx, sabotage_resolver: bool) -> Result<RaceStats, String> {
    let disk = |rng: &mut Rng| {
        if rng.chance(200_000) {
            DiskState::Inconsistent
        } else {
            DiskState::UpToDate
        }
    };
    let (d0, d1) = (disk(rng), disk(rng));
    let resolver = usize::from(rng.chance(500_000));
    let node = |i: usize, own: DiskState, peer: DiskState| Node {
        role: Role::Secondary,
        disk: own,
        peer_role: Role::Secondary,
        peer_disk: peer,
        own: None,
        resolve: i == resolver,
        retried: false,
    };
    let delay = rng.range(1, 40);
    let mut r = Round {
        ctx,
        nodes: [node(0, d0, d1), node(1, d1, d0)],
        up: true,
        gen: 1,
        now: 0,
        ready: [0; 2],
        events: Vec::new(),
        seq: 0,
        granted: 0,
        in_flight: 0,
        stats: RaceStats {
            rounds: 1,
            ..RaceStats::default()
        },
        sabotage_resolver,
        delay_max: delay,
        rng,
    };
    let (t0, t1) = (r.rng.below(2 * delay), r.rng.below(2 * delay));
    r.at(t0, Ev::Cmd(0));
    r.at(t1, Ev::Cmd(1));
    let drop = r.rng.chance(330_000);
    if drop {
        let t = r.rng.below(4 * delay);
        r.at(t, Ev::Drop);
    }
    let mut n = 0;
    while let Some(i) = (0..r.events.len()).min_by_key(|&i| (r.events[i].0, r.events[i].1)) {
        n += 1;
        if n > MAX_EVENTS {
            return Err(format!("more than {MAX_EVENTS} events"));
        }
        let (at, _, ev) = r.events.swap_remove(i);
        r.now = at;
        r.step(ev)?;
        let primaries = r.nodes.iter().filter(|n| n.role == Role::Primary).count();
        if primaries > 1 {
            return Err(format!("two Primaries after {ev:?}: {:?}", r.nodes));
        }
        if r.granted > 1 {
            return Err(format!(
                "{} promotion requests granted: {:?}",
                r.granted, r.nodes
            ));
        }
    }
    let primaries = r.nodes.iter().filter(|n| n.role == Role::Primary).count();
    if !drop && d0.max(d1) == DiskState::UpToDate && primaries != 1 {
        return Err(format!(
            "no drop, an UpToDate node, and {primaries} Primaries at the end: {:?}",
            r.nodes
        ));
    }
    r.stats.promoted = primaries as u64;
    Ok(r.stats)
}

impl Round<'_> {
    fn at(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.events.push((self.now + delay, self.seq, ev));
    }

    /// Sends `msg` to node `to` on its ordered stream.
    fn send(&mut self, to: usize, msg: Msg) -> Result<(), String> {
        if !self.up {
            return Ok(());
        }
        // Through the codec, as the peer's receiver reads it.
        let pkt = match msg {
            Msg::Req { mask, val } => Packet::ReqState {
                cmd: Command::P_STATE_CHG_REQ,
                req: ReqState { mask, val },
            },
            Msg::Reply(retcode) => Packet::ReqStateReply {
                cmd: Command::P_STATE_CHG_REPLY,
                retcode,
            },
            Msg::State(_) => Packet::State(0),
        };
        let mut buf = Vec::new();
        encode(&pkt, &self.ctx, 0, &mut buf).map_err(|e| format!("encode {pkt:?}: {e}"))?;
        let f = decode_frame(&buf, &self.ctx)
            .map_err(|e| format!("decode: {e}"))?
            .ok_or("decode: short frame")?;
        let msg = match (f.packet, msg) {
            (Packet::ReqState { req, .. }, _) => Msg::Req {
                mask: req.mask,
                val: req.val,
            },
            (Packet::ReqStateReply { retcode, .. }, _) => Msg::Reply(retcode),
            (Packet::State(_), m @ Msg::State(_)) => m,
            (p, _) => return Err(format!("codec turned {pkt:?} into {p:?}")),
        };
        self.in_flight += 1;
        if self.in_flight > 6 {
            return Err("more than 6 messages in flight".into());
        }
        let d = self.rng.range(1, self.delay_max);
        self.ready[to] = self.ready[to].max(self.now + d);
        let gen = self.gen;
        let delay = self.ready[to] - self.now;
        self.at(delay, Ev::Deliver { to, gen, msg });
        Ok(())
    }

    /// The daemon's promotion rules ([`crate::replica::may_promote`]) with the facts
    /// this model has.
    fn refusal(&self, i: usize) -> Option<crate::replica::Refusal> {
        let n = &self.nodes[i];
        let peer = &self.nodes[1 - i];
        crate::replica::may_promote(&crate::replica::PromotionFacts {
            connected: self.up,
            peer_role: n.peer_role,
            disk: n.disk,
            peer_disk: peer.disk,
            peer_writes_active: false,
            sync_target: false,
            force: false,
        })
        .err()
    }

    fn step(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Cmd(i) => {
                if self.nodes[i].role == Role::Primary || !self.up {
                    return Ok(());
                }
                if self.refusal(i).is_some() || self.nodes[i].own.is_some() {
                    self.stats.local_refusals += 1;
                    return Ok(());
                }
                let (mask, val) = promote_request(false);
                self.nodes[i].own = Some(self.gen);
                if self.nodes[1 - i].own.is_some() {
                    self.stats.crossing += 1;
                }
                self.send(1 - i, Msg::Req { mask, val })
            }
            Ev::Drop => {
                self.up = false;
                self.gen += 1;
                for n in &mut self.nodes {
                    if n.own.take().is_some() {
                        self.stats.dropped += 1;
                    }
                    n.peer_role = Role::Unknown;
                }
                Ok(())
            }
            Ev::Deliver { to, gen, msg } => {
                if gen != self.gen {
                    return Ok(()); // lost with its connection
                }
                self.in_flight -= 1;
                self.deliver(to, msg)
            }
        }
    }

    fn deliver(&mut self, to: usize, msg: Msg) -> Result<(), String> {
        let n = self.nodes[to];
        match msg {
            Msg::Req { mask, val } => {
                let local = Local {
                    role: n.role,
                    disk: n.disk,
                    conn: ConnState::Connected,
                    peer_disk: n.peer_disk,
                    own_request_pending: n.own.is_some(),
                    resolve_conflicts: n.resolve && !self.sabotage_resolver,
                };
                let d = decide(&local, mask, val);
                if d.rv.is_success() {
                    self.granted += 1;
                    let node = &mut self.nodes[to];
                    if let Some(disk) = d.grant.peer_disk {
                        node.peer_disk = disk;
                    }
                    if let Some(role) = d.grant.peer_role {
                        node.peer_role = role;
                    }
                }
                self.send(1 - to, Msg::Reply(d.rv.code()))
            }
            Msg::Reply(code) => {
                if n.own != Some(self.gen) {
                    return Err(format!("node {to} got a reply without a pending request"));
                }
                self.nodes[to].own = None;
                let rv = StateRv::from_code(code);
                if !rv.is_success() {
                    if rv == StateRv::ConcurrentStChg {
                        self.stats.concurrent_refusals += 1;
                        if !n.retried && self.rng.chance(500_000) {
                            self.nodes[to].retried = true;
                            let d = self.rng.range(1, 2 * self.delay_max);
                            self.at(d, Ev::Cmd(to));
                        }
                    } else {
                        self.stats.peer_refusals += 1;
                    }
                    return Ok(());
                }
                // `change_role` re-checks the local rules; the peer is told either way.
                if self.refusal(to).is_some() {
                    self.stats.local_refusals += 1;
                    return self.send(1 - to, Msg::State(Role::Secondary));
                }
                if n.disk != DiskState::UpToDate {
                    return Err(format!("node {to} became Primary with a {} disk", n.disk));
                }
                self.nodes[to].role = Role::Primary;
                self.send(1 - to, Msg::State(Role::Primary))
            }
            Msg::State(role) => {
                self.nodes[to].peer_role = role;
                Ok(())
            }
        }
    }
}

impl super::Sim {
    /// Checker 10 for this seed (its own random stream).
    pub(super) fn races(&mut self, seed: u64) -> Result<(), String> {
        let mut rng = Rng::new(super::rng::mix(seed ^ 0x7261_6365));
        #[cfg(test)]
        let sabotage = self.sabotage.resolver_ignores_pending;
        #[cfg(not(test))]
        let sabotage = false;
        let s = run_rounds(&mut rng, sabotage)?;
        self.report.races += s.rounds;
        self.report.race_crossing += s.crossing;
        self.report.race_concurrent_refusals += s.concurrent_refusals;
        self.report.race_dropped += s.dropped;
        Ok(())
    }
}
