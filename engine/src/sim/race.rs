//! Checker 10: concurrent promotion requests (`state::change`), a small sub-simulation
//! run [`ROUNDS`] times on every seed, from its own random stream.
//!
//! Two connected Secondaries, A and B; exactly one holds `RESOLVE_CONFLICTS` (drawn).
//! Each is told `primary` at a random moment within a few network delays of the other
//! (so the requests often cross). Each node is the daemon's [`Node`], told `primary`
//! through [`Node::step`] (`Admin::Promote`, `replica/role_cmd.rs`): it refuses by its
//! rules ([`Node::may_promote`]) when it knows its peer is Primary or its disk is not
//! UpToDate (drawn Inconsistent on about a fifth of the nodes), and while a request of
//! its own is pending; otherwise it sends `P_STATE_CHG_REQ` ([`promote_request`],
//! through the real codec) and waits. The receiver answers with `Event::StateRequest`
//! (the real `state::change::decide` over its state, its pending request, its
//! `resolve_conflicts`, and the reply it sends, as the daemon's); a grant makes it
//! record the peer's role and disk. The reply goes back as `Event::StateReply`: a
//! refusal answers the command; a grant starts the promotion, whose plan is durable at
//! once in the model (`Event::Persisted`: the rules again, then the role and its
//! `P_STATE`); a grant it cannot use makes it send `P_STATE` (still Secondary), as in
//! the daemon. A node refused with
//! `SS_CONCURRENT_ST_CHG` retries once on about half of the rounds. Each direction is
//! one ordered stream with random delays; on about a third of the rounds the connection
//! drops at a random moment (`Event::ConnectionLost`): what is in flight is lost, a
//! pending request fails (`Action::Reply`), the
//! peer's role becomes unknown, and nobody is told `primary` again (a node that lost its
//! peer and promotes alone is a split brain, checker 8's subject: tandem has no fencing).
//!
//! Checked after every event: never two Primaries; at most one request granted per
//! round; a node becomes Primary only on a success reply of the current connection and
//! with an UpToDate disk. At the end of a round without a drop in which at least one
//! node is UpToDate: exactly one Primary (someone wins the race). Bounds: at most
//! 6 messages in flight, 16 events a round.

use super::rng::Rng;
use crate::replica::{Action, Admin, Event, Node, Outcome, Up, Why};
use crate::request::{Primary, PrimaryConfig, Receiver, ReceiverConfig};
use crate::resync::TickInput;
use crate::state::change::{promote_request, StateRv};
use crate::state::uuid::UuidSet;
use crate::state::{DiskState, Protocol, Role};
use crate::wire::{decode_frame, encode, ff, Command, Packet, ReqState, StateBits, WireCtx};

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

/// One of the two nodes: the daemon's [`Node`] (its role, disk, view of the peer, its
/// pending request and promotion sequence), and what the model's operator keeps.
struct Peer {
    node: Node,
    resolve: bool,
    retried: bool,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = &self.node;
        write!(
            f,
            "{}/{} (peer {}/{}, own request {:?})",
            n.role, n.disk, n.peer_role, n.peer_disk, n.asking
        )
    }
}

/// A Secondary's node over tiny cores (the race needs only its state), connected to a
/// Secondary peer whose disk is `peer`.
fn node(disk: DiskState, peer: DiskState) -> Result<Node, String> {
    let primary = Primary::new(PrimaryConfig::new(Protocol::C, 8)).map_err(|e| e.to_string())?;
    let receiver = Receiver::new(ReceiverConfig::new(8)).map_err(|e| e.to_string())?;
    // A generation after the initial sync (a pair just created would announce it).
    let uuids = UuidSet {
        current: 0x5EED_0000,
        bitmap: 0,
        history: [0; 2],
    };
    let mut n = Node::new(primary, receiver, uuids, disk);
    // Connected (its `P_STATE` is dropped: the race starts from there).
    let up = Up {
        version: 101,
        peer_role: Role::Secondary,
        peer_disk: peer,
        run: None,
        peer_verify: false,
        tick: TickInput::default(),
    };
    n.step(Event::ConnectionUp(up), &mut Vec::new())
        .map_err(|e| e.to_string())?;
    Ok(n)
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
    nodes: [Peer; 2],
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
    let peer = |i: usize, own: DiskState, other: DiskState| -> Result<Peer, String> {
        Ok(Peer {
            node: node(own, other)?,
            resolve: i == resolver,
            retried: false,
        })
    };
    let delay = rng.range(1, 40);
    let mut r = Round {
        ctx,
        nodes: [peer(0, d0, d1)?, peer(1, d1, d0)?],
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
        let primaries = r
            .nodes
            .iter()
            .filter(|n| n.node.role == Role::Primary)
            .count();
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
    let primaries = r
        .nodes
        .iter()
        .filter(|n| n.node.role == Role::Primary)
        .count();
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

    fn step(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Cmd(i) => {
                if self.nodes[i].node.role == Role::Primary || !self.up {
                    return Ok(());
                }
                let crossing = self.nodes[1 - i].node.asking.is_some();
                let r = self.rng.next_u64() | 2;
                let cmd = Admin::Promote {
                    force: false,
                    random: [r, r],
                };
                let mut out = Vec::new();
                let n = &mut self.nodes[i].node;
                match n.step(Event::Admin { cmd, reply: 1 }, &mut out) {
                    Ok(Outcome::Refused(_)) => {
                        self.stats.local_refusals += 1;
                        return Ok(());
                    }
                    Ok(Outcome::AskedPeer) => {}
                    o => return Err(format!("node {i}'s `primary` while connected: {o:?}")),
                }
                let [Action::Send {
                    pkt: Packet::ReqState { req, .. },
                    ..
                }] = out[..]
                else {
                    return Err(format!("node {i}'s promotion request was {out:?}"));
                };
                if crossing {
                    self.stats.crossing += 1;
                }
                let (mask, val) = (req.mask, req.val);
                if (mask, val) != promote_request(false) {
                    return Err(format!("node {i} asked {mask:#x}/{val:#x}"));
                }
                self.send(1 - i, Msg::Req { mask, val })
            }
            Ev::Drop => {
                self.up = false;
                self.gen += 1;
                for n in &mut self.nodes {
                    let mut out = Vec::new();
                    let ev = Event::ConnectionLost { random: 0 };
                    n.node.step(ev, &mut out).map_err(|e| e.to_string())?;
                    for a in out {
                        match a {
                            // Its pending request fails with the connection.
                            Action::Reply { .. } => self.stats.dropped += 1,
                            // A Primary that lost its peer starts a generation.
                            Action::Persist { .. } if n.node.role == Role::Primary => {}
                            a => {
                                return Err(format!(
                                    "a connection loss without writes asked for {a:?}"
                                ))
                            }
                        }
                    }
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
        match msg {
            Msg::Req { mask, val } => {
                let n = &mut self.nodes[to];
                let ev = Event::StateRequest {
                    cmd: Command::P_STATE_CHG_REQ,
                    req: ReqState { mask, val },
                    resolve_conflicts: n.resolve && !self.sabotage_resolver,
                    random: 0,
                };
                let mut out = Vec::new();
                let answered = n.node.step(ev, &mut out).map_err(|e| e.to_string())?;
                let Outcome::Answered(rv) = answered else {
                    return Err(format!(
                        "node {to} did not answer the request: {answered:?}"
                    ));
                };
                // Only the reply: a promotion request grants the peer's role, nothing
                // that resyncs or starts a generation.
                let [Action::Send {
                    pkt: Packet::ReqStateReply { retcode, .. },
                    ..
                }] = out[..]
                else {
                    return Err(format!(
                        "node {to} answered a promotion request with {out:?}"
                    ));
                };
                if rv.is_success() {
                    self.granted += 1;
                }
                self.send(1 - to, Msg::Reply(retcode))
            }
            Msg::Reply(code) => {
                let retried = self.nodes[to].retried;
                if self.nodes[to].node.asking.is_none() {
                    return Err(format!("node {to} got a reply without a pending request"));
                }
                let mut out = Vec::new();
                let n = &mut self.nodes[to].node;
                n.step(Event::StateReply { code }, &mut out)
                    .map_err(|e| e.to_string())?;
                match out.first() {
                    Some(Action::Reply {
                        refused: Why::PeerRefused(rv),
                        ..
                    }) => {
                        if *rv == StateRv::ConcurrentStChg {
                            self.stats.concurrent_refusals += 1;
                            if !retried && self.rng.chance(500_000) {
                                self.nodes[to].retried = true;
                                let d = self.rng.range(1, 2 * self.delay_max);
                                self.at(d, Ev::Cmd(to));
                            }
                        } else {
                            self.stats.peer_refusals += 1;
                        }
                        Ok(())
                    }
                    _ => self.promote(to, out),
                }
            }
            Msg::State(role) => {
                let n = &mut self.nodes[to].node;
                let disk = n.peer_disk;
                n.peer_reported(role, disk);
                Ok(())
            }
        }
    }

    /// The node's promotion after the peer's grant (`out`: what the reply led to): its
    /// plan, durable at once in the model, then the rules again and the role; the peer
    /// is told the node's state either way (the `P_STATE` among its actions, with or
    /// without the role).
    fn promote(&mut self, to: usize, mut out: Vec<Action>) -> Result<(), String> {
        let n = &mut self.nodes[to].node;
        if let Some(Action::Persist { then, .. }) = out.first() {
            let ev = Event::Persisted {
                then: *then,
                ok: true,
            };
            out.clear();
            if let Outcome::Refused(why) = n.step(ev, &mut out).map_err(|e| e.to_string())? {
                return Err(format!("node {to}'s durable promotion refused: {why}"));
            }
            if n.disk != DiskState::UpToDate {
                return Err(format!("node {to} became Primary with a {} disk", n.disk));
            }
        } else {
            self.stats.local_refusals += 1;
        }
        for a in out {
            match a {
                Action::Send {
                    pkt: Packet::State(word),
                    ..
                } => {
                    let role = StateBits::unpack(word).role;
                    let role = Role::from_u32(u32::from(role)).ok_or("P_STATE with a bad role")?;
                    self.send(1 - to, Msg::State(role))?;
                }
                Action::RoleChanged(_) | Action::Reply { .. } => {}
                a => return Err(format!("node {to}'s promotion asked for {a:?}")),
            }
        }
        Ok(())
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
