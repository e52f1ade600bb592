//! Day 0 of a pair prepared with `create-md` (checker 14), through the node's own
//! commands (`replica/admin.rs`, `replica/roles.rs`).
//!
//! On about one seed in eight both nodes start from just-created metadata: the current
//! UUID `UUID_JUST_CREATED`, the disks Inconsistent, every block marked out of sync —
//! and both disks all zeroes, so known to be equal (fresh thin volumes). While they are
//! connected, the operator runs `new-current-uuid --clear-bitmap` on the node that will
//! be Primary (`Event::Admin`): `Node::skip_initial_sync` declares the pair in sync and
//! asks for its first generation to be made durable (`Action::Persist`; the model has no
//! superblock: durable when assigned, the pages with it); then (`Event::Persisted`) it
//! sends `P_UUIDS` with the skip-initial-sync flag, through the codec; the peer adopts it
//! (`Event::PeerUuids`, `Node::peer_skipped_initial_sync`) the same way. Then
//! `primary` on the first node (`Admin::Promote`, asking the peer through the codec:
//! `sim/roles.rs`) and the run starts as on every seed, with its first handshake.
//!
//! Checked (checker 14): before that handshake both nodes are UpToDate with empty
//! bitmaps and one generation, and the handshake connects without a resync (an
//! initial sync that was skipped does not run anyway).

use super::resync::uuid;
use super::rng::Rng;
use super::Sim;
use crate::replica::{Action, Admin, Durable, Event, Node, Outcome, Up};
use crate::resync::TickInput;
use crate::state::uuid::{UuidPacket, UuidSet};
use crate::state::{DiskState, Role};
use crate::wire::{decode_frame, encode, ff, Packet, WireCtx};

/// The protocol version both nodes agree on.
const AGREED: u32 = 101;

/// A seed's draw (a stream of its own, so that the other seeds run as before).
pub(super) fn drawn(seed: u64) -> Option<Rng> {
    let (rng, happens) = Rng::scenario(seed, 0x6672_6573_6870, 125_000);
    happens.then_some(rng)
}

/// Day 0 of a fresh pair (see the module docs): `pn` becomes Primary, `sn` its
/// Secondary, both UpToDate in one generation.
pub(super) fn day0(pn: &mut Node, sn: &mut Node, rng: &mut Rng) -> Result<(), String> {
    for n in [&mut *pn, &mut *sn] {
        n.role = Role::Secondary;
        n.uuids = UuidSet::JUST_CREATED;
        n.disk = DiskState::Inconsistent;
        n.primary.out_of_sync_mut().mark_all();
    }
    // Connected, as their handshake decides for two just-created disks: the connection's
    // start through each node's step, its `P_STATE`s dropped (each peer knows the other
    // from the handshake).
    let mut out = Vec::new();
    for n in [&mut *pn, &mut *sn] {
        let up = Up {
            version: AGREED,
            peer_role: Role::Secondary,
            peer_disk: DiskState::Inconsistent,
            run: None,
            peer_verify: false,
            tick: TickInput::default(),
        };
        n.step(Event::ConnectionUp(up), &mut out)
            .map_err(|e| format!("checker 14: the connection's start: {e}"))?;
    }
    if let Some(a) = out.drain(..).find(|a| !matches!(a, Action::Send { .. })) {
        return Err(format!(
            "checker 14: the connection's start asked for {a:?}"
        ));
    }
    let cmd = Admin::NewCurrentUuid {
        clear_bitmap: true,
        random: uuid(rng),
    };
    let refused = pn.step(Event::Admin { cmd, reply: 0 }, &mut out);
    if let Ok(Outcome::Refused(e)) = refused {
        return Err(format!(
            "checker 14: --clear-bitmap refused on a fresh pair: {e}"
        ));
    }
    refused.map_err(|e| e.to_string())?;
    persisted(pn, &mut out)?;
    let ctx = WireCtx::new(AGREED, ff::PRO_FEATURES_84).map_err(|e| e.to_string())?;
    for a in std::mem::take(&mut out) {
        match a {
            Action::Send { pkt, .. } => match through_codec(&pkt, &ctx)? {
                Packet::Uuids(u) => {
                    // The peer's side (`Event::PeerUuids`): its plan, then its `P_STATE`.
                    let p = UuidPacket::from(u);
                    sn.step(Event::PeerUuids(p), &mut out)
                        .map_err(|e| e.to_string())?;
                    persisted(sn, &mut out)?;
                    out.retain(|a| !matches!(a, Action::Send { .. }));
                }
                Packet::State(_) => {}
                p => return Err(format!("checker 14: --clear-bitmap sent {p:?}")),
            },
            a => return Err(format!("checker 14: --clear-bitmap asked for {a:?}")),
        }
    }
    // (The pair's first generation is set: one draw, as a promotion that announces none.)
    let r = uuid(rng);
    super::roles::promote(pn, Some((sn, &ctx)), [r, r], |_, _| Ok(true), &mut out)
        .map_err(|e| format!("checker 14: the first promotion: {e}"))?;
    // (Its `P_STATE` reaches a peer that the run's first handshake informs anyway.)
    for n in [&mut *pn, &mut *sn] {
        n.connection_lost(&mut out);
    }
    if let Some(a) = out.iter().find(|a| !matches!(a, Action::Send { .. })) {
        return Err(format!("checker 14: day 0 asked for {a:?}"));
    }
    Ok(())
}

/// Performs the node's [`Action::Persist`]s among `out` as the model does (no metadata
/// device here: the generation is durable when assigned), each followed by its
/// [`Event::Persisted`], whose actions join `out`.
fn persisted(n: &mut Node, out: &mut Vec<Action>) -> Result<(), String> {
    for a in std::mem::take(out) {
        match a {
            Action::Persist { plan, then, .. } => {
                for step in &plan {
                    if let Durable::Superblock(changes) = step {
                        if let Some(u) = Durable::uuids(changes) {
                            n.uuids = u;
                        }
                    }
                }
                n.step(Event::Persisted { then, ok: true }, out)
                    .map_err(|e| e.to_string())?;
            }
            a => out.push(a),
        }
    }
    Ok(())
}

/// A packet as the peer's receiver reads it.
pub(super) fn through_codec(pkt: &Packet, ctx: &WireCtx) -> Result<Packet, String> {
    let mut buf = Vec::new();
    encode(pkt, ctx, 0, &mut buf).map_err(|e| format!("encode {pkt:?}: {e}"))?;
    Ok(decode_frame(&buf, ctx)
        .map_err(|e| format!("decode: {e}"))?
        .ok_or("decode: short frame")?
        .packet)
}

impl Sim {
    /// Checker 14 before the first handshake of a fresh pair (on other seeds, nothing).
    pub(super) fn check14_before_handshake(&self) -> Result<(), String> {
        if !self.fresh_pending {
            return Ok(());
        }
        for (who, n) in [("primary", &self.pn), ("secondary", &self.sn)] {
            if n.disk != DiskState::UpToDate || n.primary.out_of_sync().count() != 0 {
                return Err(format!(
                    "checker 14: after the skipped initial sync the {who} is {} with {} \
                     blocks out of sync",
                    n.disk,
                    n.primary.out_of_sync().count()
                ));
            }
        }
        if self.pn.uuids.current & !1 != self.sn.uuids.current & !1 {
            return Err(format!(
                "checker 14: the skipped initial sync left two generations: primary {}, \
                 secondary {}",
                self.pn.uuids, self.sn.uuids
            ));
        }
        Ok(())
    }

    /// Checker 14 at the first handshake of a fresh pair: it `connected` without a
    /// resync or a refusal (`what`: the handshake, for the message).
    pub(super) fn check14_first_handshake(
        &mut self,
        connected: bool,
        what: &dyn Fn() -> String,
    ) -> Result<(), String> {
        if std::mem::take(&mut self.fresh_pending) && !connected {
            return Err(format!(
                "checker 14: the first handshake after a skipped initial sync did not \
                 connect without a resync: {}",
                what()
            ));
        }
        Ok(())
    }
}
