//! `primary` and `secondary` as events of [`Node::step`]: the promotion's request to the
//! peer and its reply, the durable plans and what follows them — the sequences of
//! `roles.rs`, driven by events so that the daemon and the simulator run them the same.
//!
//! - **`primary`** ([`super::Admin::Promote`]): the rules first ([`Node::may_promote`];
//!   a refusal is the operator's message, [`Why`]). Alone, the promotion starts at once.
//!   Connected, the peer is asked first (`P_STATE_CHG_REQ`, DRBD's cluster-wide state
//!   change, `state::change`), so that two nodes told `primary` at the same instant
//!   never both become Primary: [`super::Outcome::AskedPeer`] — the driver feeds
//!   [`super::Event::PeerSilent`] if no reply came within its `timeout` (the connection
//!   is then dropped, as DRBD does with a peer that does not answer). The peer's reply
//!   ([`super::Event::StateReply`]) refuses it, or grants it for this connection: the
//!   promotion starts ([`Node::begin_promotion`]) and its plan is an
//!   [`Action::Persist`] ([`Then::Promoted`]). Once durable, the rules again on the
//!   same connection ([`Node::may_take_primary`]) and the role is taken
//!   ([`Node::take_primary`]), or the promotion is abandoned: the old generation and
//!   "not Primary" are staged ([`Node::abandon_promotion`]) and a peer that granted it
//!   is told this node's real state. A connection lost while the peer considers the
//!   request answers it with a refusal.
//! - **`secondary`** ([`super::Admin::Demote`]): [`Node::begin_demotion`] (the role at
//!   once), its plan an [`Action::Persist`] ([`Then::Demoted`]); once durable the peer
//!   is told. A failed plan takes the disk out of use ([`Node::demotion_failed`]),
//!   except on a Diskless Primary, whose metadata is on the failed disk: there the
//!   plan is best effort (its failure record already asks for a full sync).
//!
//! One role change at a time: a command while another is asked, promoting or demoting
//! is refused. Every command the node takes is answered once: a refusal at once
//! ([`super::Outcome::Refused`]), or, later, [`Action::Reply`] (a refusal that came from
//! the peer or the connection) or the end of its plan ([`super::Event::Persisted`]'s
//! outcome). [`Action::RoleChanged`] tells the driver when the role is taken (its log
//! and events).

use super::roles::Refusal;
use super::{Action, Durable, Node, Outcome, Then};
use crate::net::Stream;
use crate::request::Error;
use crate::state::change::{self, StateRv};
use crate::state::Role;
use crate::wire::{Command, Packet, ReqState};
use std::fmt;

/// A promotion that asked the peer (`P_STATE_CHG_REQ`) and waits for its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Asking {
    /// The connection it asked on ([`Node::connections`]).
    connection: u64,
    /// The driver's handle of the command.
    reply: u64,
    force: bool,
    /// The draws of the generation it starts (at most two, see `roles.rs`).
    random: [u64; 2],
}

/// Why a management command was refused: the operator's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    Said(&'static str),
    /// The promotion rules (`roles.rs`).
    Promotion(Refusal),
    /// The peer refused this node's promotion with this code.
    PeerRefused(StateRv),
}

impl From<&'static str> for Why {
    fn from(s: &'static str) -> Why {
        Why::Said(s)
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Said(s) => f.write_str(s),
            Why::Promotion(r) => r.fmt(f),
            Why::PeerRefused(rv) => write!(
                f,
                "the peer refused the promotion: {} ({})",
                rv.describe(),
                rv.code()
            ),
        }
    }
}

impl Node {
    /// A role change is being asked, promoted or demoted.
    fn changing_role(&self) -> bool {
        self.asking.is_some() || self.promoting || self.demoting
    }

    /// `primary` (`force`: `primary --force`; `random`: the draws of its generation)
    /// under the driver's handle `reply` (see the module docs).
    pub(super) fn promote_cmd(
        &mut self,
        force: bool,
        random: [u64; 2],
        reply: u64,
        out: &mut Vec<Action>,
    ) -> Result<Outcome, Why> {
        if self.changing_role() {
            return Err("another role change is in progress; retry".into());
        }
        if self.role == Role::Primary {
            return Ok(Outcome::Done);
        }
        self.may_promote(force).map_err(Why::Promotion)?;
        if self.agreed.is_none() {
            self.start_promotion(force, random, reply, out)
                .map_err(Why::Promotion)?;
            return Ok(Outcome::Persisting);
        }
        let (mask, val) = change::promote_request(force);
        out.push(Action::Send {
            stream: Stream::Data,
            pkt: Packet::ReqState {
                cmd: Command::P_STATE_CHG_REQ,
                req: ReqState { mask, val },
            },
        });
        self.asking = Some(Asking {
            connection: self.connections,
            reply,
            force,
            random,
        });
        Ok(Outcome::AskedPeer)
    }

    /// The promotion starts ([`Node::begin_promotion`]); its plan is asked for.
    fn start_promotion(
        &mut self,
        force: bool,
        random: [u64; 2],
        reply: u64,
        out: &mut Vec<Action>,
    ) -> Result<(), Refusal> {
        let mut draws = random.into_iter();
        let p = self.begin_promotion(force, || draws.next().unwrap_or(random[1]))?;
        tracing::info!("generation UUIDs {} (were {})", p.uuids, p.old);
        out.push(Action::Persist {
            plan: vec![Durable::Superblock(p.durable())],
            then: Then::Promoted(p),
            reply: Some(reply),
        });
        Ok(())
    }

    /// The peer's `P_STATE_CHG_REPLY` / `P_CONN_ST_CHG_REPLY` to this node's request.
    pub(super) fn state_reply(&mut self, code: i32, out: &mut Vec<Action>) {
        let Some(a) = self
            .asking
            .take()
            .filter(|a| self.agreed.is_some() && a.connection == self.connections)
        else {
            tracing::warn!("state change reply {code} without a request; ignored");
            return;
        };
        let rv = StateRv::from_code(code);
        if !rv.is_success() {
            out.push(Action::Reply {
                reply: a.reply,
                refused: Why::PeerRefused(rv),
            });
            return;
        }
        if let Err(r) = self.start_promotion(a.force, a.random, a.reply, out) {
            // The peer granted it and counts this node as Primary: tell it the truth.
            self.push_state(out);
            out.push(Action::Reply {
                reply: a.reply,
                refused: Why::Promotion(r),
            });
        }
    }

    /// The driver's timeout for the peer's reply to command `reply` expired: a peer
    /// that does not answer in time is dead (DRBD's `timeout`), the connection dropped.
    pub(super) fn peer_silent(&mut self, reply: u64, out: &mut Vec<Action>) -> Outcome {
        if self.asking.is_none_or(|a| a.reply != reply) {
            return Outcome::Done; // answered meanwhile
        }
        self.asking = None;
        out.push(Action::DropConnection {
            reason: "the peer did not answer a state change request within timeout",
        });
        Outcome::Refused(Why::Said(
            "the peer did not answer the promotion request within timeout; the connection \
             is dropped (retry to promote without it)",
        ))
    }

    /// The connection is gone: a request the peer was considering is refused.
    pub(super) fn asking_lost(&mut self, out: &mut Vec<Action>) {
        if let Some(a) = self.asking.take() {
            out.push(Action::Reply {
                reply: a.reply,
                refused: Why::Said(
                    "the connection was lost while the peer considered the promotion; retry",
                ),
            });
        }
    }

    /// `secondary` (see the module docs); the driver checks what only it knows first
    /// (a frontend client holding the device open).
    pub(super) fn demote_cmd(&mut self, reply: u64, out: &mut Vec<Action>) -> Result<Outcome, Why> {
        if self.changing_role() {
            return Err("another role change is in progress; retry".into());
        }
        if self.role == Role::Secondary {
            return Ok(Outcome::Done);
        }
        let detached = self.primary.is_detached();
        let plan = self.begin_demotion(out)?;
        self.demoting = true;
        out.push(Action::Persist {
            plan,
            then: Then::Demoted { detached },
            reply: Some(reply),
        });
        Ok(Outcome::Persisting)
    }

    /// A role change's plan is durable (`ok`) or failed: the role taken, or the
    /// promotion abandoned (its refusal the outcome when it was durable); the demotion
    /// told, or the disk out of use. `Err`: a contract violation.
    pub(super) fn role_persisted(
        &mut self,
        then: Then,
        ok: bool,
        out: &mut Vec<Action>,
    ) -> Result<Outcome, Error> {
        match then {
            Then::Promoted(p) => {
                let take = if ok {
                    self.may_take_primary(&p)
                } else {
                    Ok(())
                };
                if ok && take.is_ok() {
                    if p.forced {
                        tracing::warn!("forced promotion: this disk's data is now the good copy");
                    }
                    self.take_primary(&p, out)?;
                    out.push(Action::RoleChanged(Role::Primary));
                    return Ok(Outcome::Done);
                }
                let changes = self.abandon_promotion(&p);
                out.push(Action::Persist {
                    plan: vec![Durable::Superblock(changes)],
                    then: Then::Nothing,
                    reply: None,
                });
                if p.connected() && self.agreed.is_some() {
                    // The peer granted it and counts this node as Primary.
                    self.push_state(out);
                }
                Ok(take.err().map_or(Outcome::Done, Outcome::Refused))
            }
            Then::Demoted { detached } => {
                self.demoting = false;
                if ok || detached {
                    if self.agreed.is_some() {
                        self.push_state(out);
                    }
                    out.push(Action::RoleChanged(Role::Secondary));
                } else {
                    self.demotion_failed(out);
                }
                Ok(Outcome::Done)
            }
            _ => Err(Error::Invalid("not a role change's plan")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::meta::disk::SbChange;
    use crate::replica::node::TEST_GEN as GEN;
    use crate::replica::{Admin, Event};
    use crate::state::DiskState;

    fn node() -> Node {
        Node::for_test(64, GEN, DiskState::UpToDate)
    }

    fn step(n: &mut Node, ev: Event) -> (Outcome, Vec<Action>) {
        let mut out = Vec::new();
        let o = n.step(ev, &mut out).unwrap();
        (o, out)
    }

    fn promote(n: &mut Node, reply: u64) -> (Outcome, Vec<Action>) {
        let cmd = Admin::Promote {
            force: false,
            random: [0xB010, 0xB020],
        };
        step(n, Event::Admin { cmd, reply })
    }

    /// The plan and what follows it of the one `Persist` among `out`.
    fn persist(out: &[Action]) -> (Vec<Durable>, Then, Option<u64>) {
        let found = out.iter().find_map(|a| match a {
            Action::Persist { plan, then, reply } => Some((plan.clone(), *then, *reply)),
            _ => None,
        });
        found.unwrap_or_else(|| panic!("no plan among {out:?}"))
    }

    /// A Primary alone: promoted, its plan durable.
    fn primary() -> Node {
        let mut n = node();
        let (_, out) = promote(&mut n, 1);
        let then = persist(&out).1;
        step(&mut n, Event::Persisted { then, ok: true });
        n
    }

    fn reply_of(out: &[Action]) -> Option<(u64, Why)> {
        out.iter().find_map(|a| match a {
            Action::Reply { reply, refused } => Some((*reply, *refused)),
            _ => None,
        })
    }

    #[test]
    fn alone_the_promotion_is_a_plan_and_the_role_is_taken_once_it_is_durable() {
        let mut n = node();
        let (o, out) = promote(&mut n, 7);
        assert_eq!(o, Outcome::Persisting);
        let (plan, then, reply) = persist(&out);
        assert_eq!(reply, Some(7));
        let [Durable::Superblock(changes)] = &plan[..] else {
            panic!("one superblock write: {plan:?}");
        };
        assert!(changes.contains(&SbChange::Primary(true)));
        assert!(changes.contains(&SbChange::Uuids(n.uuids)));
        assert_eq!(n.role, Role::Secondary, "not before it is durable");
        // A second role change meanwhile is refused.
        let (o, _) = step(
            &mut n,
            Event::Admin {
                cmd: Admin::Demote,
                reply: 8,
            },
        );
        assert!(matches!(o, Outcome::Refused(w) if w.to_string().contains("in progress")));
        let (o, out) = step(&mut n, Event::Persisted { then, ok: true });
        assert_eq!(o, Outcome::Done);
        assert!(
            matches!(out[..], [Action::RoleChanged(Role::Primary)]),
            "{out:?}"
        );
        assert_eq!(n.role, Role::Primary);
        assert!(!n.promoting);
        // Already Primary: done at once.
        assert_eq!(promote(&mut n, 9).0, Outcome::Done);
    }

    #[test]
    fn a_failed_promotion_plan_restores_the_old_generation() {
        let mut n = node();
        let (_, out) = promote(&mut n, 1);
        let (_, then, _) = persist(&out);
        assert_ne!(n.uuids, GEN, "assigned at once");
        let (o, out) = step(&mut n, Event::Persisted { then, ok: false });
        assert_eq!(o, Outcome::Done, "the driver answers with its IO error");
        let (plan, then, reply) = persist(&out);
        assert_eq!(
            plan,
            [Durable::Superblock(vec![
                SbChange::Primary(false),
                SbChange::Uuids(GEN)
            ])]
        );
        assert_eq!((then, reply), (Then::Nothing, None));
        assert_eq!(
            (n.uuids, n.role, n.promoting),
            (GEN, Role::Secondary, false)
        );
    }

    #[test]
    fn connected_the_peer_is_asked_and_its_refusal_or_silence_answers() {
        let mut n = node();
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        let (o, out) = promote(&mut n, 3);
        assert_eq!(o, Outcome::AskedPeer);
        let (mask, val) = change::promote_request(false);
        let [Action::Send {
            stream: Stream::Data,
            pkt: Packet::ReqState { cmd, req },
        }] = out[..]
        else {
            panic!("{out:?}");
        };
        assert_eq!(
            (cmd, req),
            (Command::P_STATE_CHG_REQ, ReqState { mask, val })
        );
        assert!(
            matches!(promote(&mut n, 4).0, Outcome::Refused(_)),
            "one at a time"
        );
        // The peer's own request crosses it: this node counts its request as pending.
        assert!(!n
            .peer_request(ReqState { mask, val }, true)
            .0
            .rv
            .is_success());
        let code = StateRv::ConcurrentStChg.code();
        let (_, out) = step(&mut n, Event::StateReply { code });
        assert_eq!(
            reply_of(&out),
            Some((3, Why::PeerRefused(StateRv::ConcurrentStChg)))
        );
        assert_eq!((n.role, n.asking), (Role::Secondary, None));
        // A reply nobody waits for is ignored.
        let (_, out) = step(&mut n, Event::StateReply { code: 1 });
        assert!(out.is_empty(), "{out:?}");
        // Silence: the connection is dropped and the command answered.
        promote(&mut n, 5);
        assert_eq!(
            step(&mut n, Event::PeerSilent { reply: 4 }).0,
            Outcome::Done
        );
        let (o, out) = step(&mut n, Event::PeerSilent { reply: 5 });
        assert!(matches!(o, Outcome::Refused(w) if w.to_string().contains("did not answer")));
        assert!(
            matches!(out[..], [Action::DropConnection { .. }]),
            "{out:?}"
        );
        // Lost with the connection.
        promote(&mut n, 6);
        let (_, out) = step(&mut n, Event::ConnectionLost { random: 0xD000 });
        assert!(matches!(reply_of(&out), Some((6, Why::Said(w))) if w.contains("lost")));
        assert_eq!(n.asking, None);
    }

    #[test]
    fn a_granted_promotion_is_taken_unless_the_rules_changed_while_it_was_written() {
        let mut n = node();
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        promote(&mut n, 1);
        let (_, out) = step(
            &mut n,
            Event::StateReply {
                code: StateRv::Success.code(),
            },
        );
        let (_, then, reply) = persist(&out);
        assert_eq!(reply, Some(1));
        assert!(n.promoting && n.asking.is_none());
        // The peer became Primary meanwhile: refused, abandoned, the peer told.
        let mut m = node();
        m.connection_up(101, Role::Secondary, DiskState::UpToDate);
        promote(&mut m, 1);
        step(
            &mut m,
            Event::StateReply {
                code: StateRv::Success.code(),
            },
        );
        m.peer_reported(Role::Primary, DiskState::UpToDate);
        let (o, out) = step(&mut m, Event::Persisted { then, ok: true });
        assert!(matches!(
            o,
            Outcome::Refused(Why::Promotion(Refusal::PeerPrimary))
        ));
        assert_eq!(m.role, Role::Secondary);
        assert!(out.iter().any(|a| matches!(
            a,
            Action::Send {
                pkt: Packet::State(_),
                ..
            }
        )));
        assert!(matches!(persist(&out).1, Then::Nothing));
        // Taken: the peer is told the role, writes replicate.
        let (o, out) = step(&mut n, Event::Persisted { then, ok: true });
        assert_eq!(o, Outcome::Done);
        assert_eq!(n.role, Role::Primary);
        assert!(out.iter().any(|a| matches!(
            a,
            Action::Send {
                pkt: Packet::State(_),
                ..
            }
        )));
        assert!(matches!(
            out.last(),
            Some(Action::RoleChanged(Role::Primary))
        ));
    }

    #[test]
    fn a_demotion_is_a_plan_and_a_failed_one_takes_the_disk_out_unless_diskless() {
        let mut n = primary();
        let (o, out) = step(
            &mut n,
            Event::Admin {
                cmd: Admin::Demote,
                reply: 2,
            },
        );
        assert_eq!(o, Outcome::Persisting);
        let (plan, then, _) = persist(&out);
        assert_eq!(plan[0], Durable::FlushData);
        assert_eq!(then, Then::Demoted { detached: false });
        assert!(!then.best_effort());
        assert_eq!(n.role, Role::Secondary, "at once");
        assert!(
            matches!(promote(&mut n, 3).0, Outcome::Refused(_)),
            "one at a time"
        );
        let (_, out) = step(&mut n, Event::Persisted { then, ok: false });
        assert!(!out.iter().any(|a| matches!(a, Action::RoleChanged(_))));
        assert!(n.primary.stats().meta_failed, "the disk is out of use");
        assert!(!n.demoting);
        // A Diskless Primary's demotion: best effort.
        let mut n = primary();
        n.primary.detach_local();
        let (_, out) = step(
            &mut n,
            Event::Admin {
                cmd: Admin::Demote,
                reply: 2,
            },
        );
        let (_, then, _) = persist(&out);
        assert!(then.best_effort());
        let (_, out) = step(&mut n, Event::Persisted { then, ok: false });
        assert!(
            matches!(out[..], [Action::RoleChanged(Role::Secondary)]),
            "{out:?}"
        );
    }
}
