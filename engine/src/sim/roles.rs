//! The operator's `primary` and `secondary` as the simulator's drivers run them: the
//! node's own events ([`Admin::Promote`], [`Admin::Demote`], the peer's answer
//! [`Event::StateReply`], [`Event::Persisted`]; `replica/role_cmd.rs`), the plan
//! performed by the caller's model of the metadata. Used by the fresh pair's first
//! promotion, the resync model's promotions and split brains and the switchover;
//! checker 10 (`race.rs`) drives the same events with its own network.

use super::fresh::through_codec;
use crate::replica::{Action, Admin, Durable, Event, Node, Outcome, Then};
use crate::wire::{Command, Packet, WireCtx};

/// Takes the one [`Action::Persist`] out of `out`, if there is one: its plan and what
/// follows it.
pub(super) fn take_persist(out: &mut Vec<Action>) -> Option<(Vec<Durable>, Then)> {
    let i = out
        .iter()
        .position(|a| matches!(a, Action::Persist { .. }))?;
    match out.remove(i) {
        Action::Persist { plan, then, .. } => Some((plan, then)),
        _ => None,
    }
}

/// Steps `ev` on `n`; a step error fails the seed.
fn step(n: &mut Node, ev: Event, out: &mut Vec<Action>) -> Result<Outcome, String> {
    n.step(ev, out).map_err(|e| e.to_string())
}

/// The operator's `primary` on `node` (`random`: the draws of its generation). While
/// connected the request goes to `peer` and its answer comes back, each through the
/// real codec (`WireCtx`); the peer answers by its rules; the plan is
/// performed by `perform` (whether it is durable), then the role is taken. The actions
/// left (its `P_STATE` and the like; not [`Action::RoleChanged`]) join `out`.
pub(super) fn promote(
    node: &mut Node,
    peer: Option<(&mut Node, &WireCtx)>,
    random: [u64; 2],
    perform: impl FnOnce(&mut Node, &[Durable]) -> Result<bool, String>,
    out: &mut Vec<Action>,
) -> Result<(), String> {
    let mut acts = Vec::new();
    let cmd = Admin::Promote {
        force: false,
        random,
    };
    match step(node, Event::Admin { cmd, reply: 1 }, &mut acts)? {
        Outcome::Refused(why) => return Err(format!("promotion refused: {why}")),
        Outcome::Persisting => {}
        Outcome::AskedPeer => {
            let (peer, ctx) = peer.ok_or("a promotion asked a peer the model does not have")?;
            let [Action::Send { pkt, .. }] = &acts[..] else {
                return Err(format!("a promotion's request was {acts:?}"));
            };
            let Packet::ReqState { cmd, req } = through_codec(pkt, ctx)? else {
                return Err(format!("a promotion's request was {pkt:?}"));
            };
            acts.clear();
            let ev = Event::StateRequest {
                cmd,
                req,
                resolve_conflicts: false,
                random: 0,
            };
            let mut answer = Vec::new();
            let Outcome::Answered(rv) = step(peer, ev, &mut answer)? else {
                return Err("the peer did not answer the promotion request".into());
            };
            let [Action::Send { pkt, .. }] = &answer[..] else {
                return Err(format!("the peer answered a promotion with {answer:?}"));
            };
            let Packet::ReqStateReply { cmd, retcode } = through_codec(pkt, ctx)? else {
                return Err(format!("the peer answered a promotion with {pkt:?}"));
            };
            if cmd != Command::P_STATE_CHG_REPLY || retcode != rv.code() {
                return Err(format!("the peer's reply {cmd:?} {retcode} is not {rv:?}"));
            }
            step(node, Event::StateReply { code: retcode }, &mut acts)?;
            if let Some(Action::Reply { refused, .. }) =
                acts.iter().find(|a| matches!(a, Action::Reply { .. }))
            {
                return Err(format!("promotion refused: {refused}"));
            }
        }
        o => return Err(format!("a promotion's outcome was {o:?}")),
    }
    let (plan, then) = take_persist(&mut acts)
        .ok_or_else(|| format!("a promotion asked for no plan: {acts:?}"))?;
    let ok = perform(node, &plan)?;
    if let Outcome::Refused(why) = step(node, Event::Persisted { then, ok }, &mut acts)? {
        return Err(format!("a durable promotion refused: {why}"));
    }
    out.extend(
        acts.into_iter()
            .filter(|a| !matches!(a, Action::RoleChanged(_))),
    );
    Ok(())
}

/// The operator's `secondary` on `node` (a Primary): the role at once; its plan and
/// what follows it are returned for the caller to perform (its pumps may run first)
/// and to feed as [`Event::Persisted`] ([`demoted`]). The demotion's own actions join
/// `out`.
pub(super) fn demote(
    node: &mut Node,
    out: &mut Vec<Action>,
) -> Result<(Vec<Durable>, Then), String> {
    let cmd = Admin::Demote;
    match step(node, Event::Admin { cmd, reply: 1 }, out)? {
        Outcome::Persisting => {
            take_persist(out).ok_or_else(|| format!("a demotion asked for no plan: {out:?}"))
        }
        o => Err(format!("the demotion: {o:?}")),
    }
}

/// The demotion's plan was performed (`ok`): the node tells the peer (its `P_STATE`
/// joins `out`), or, failed, takes its disk out of use.
pub(super) fn demoted(
    node: &mut Node,
    then: Then,
    ok: bool,
    out: &mut Vec<Action>,
) -> Result<(), String> {
    let mut acts = Vec::new();
    step(node, Event::Persisted { then, ok }, &mut acts)?;
    out.extend(
        acts.into_iter()
            .filter(|a| !matches!(a, Action::RoleChanged(_))),
    );
    Ok(())
}
