//! Performs the replica core's durable plans ([`Durable`], `replica/durable.rs`): the
//! order is the core's, the IO is this driver's — the data disk's flush, the page writer
//! (`pages.rs`), the superblock's writer (`durable.rs`).
//!
//! A plan's leading superblock step is staged at once, under the caller's lock
//! ([`Volume::stage_plan`]), so that the in-memory change and the write gate close
//! together (no write can enter a generation that is not staged); the rest runs in
//! order off the lock ([`Volume::persist`]), each step durable before the next is
//! issued. Bounds: a plan has at most 3 steps; one metadata write and the dirty pages
//! (≤ the bitmap's pages) are in flight at a time.
//!
//! The core asks for a plan as an action too ([`crate::replica::Action::Persist`]: a
//! management command's, the peer's skipped initial sync): the drain stages it, a task
//! performs it and feeds the outcome back (`Event::Persisted`), and a management command
//! ([`Volume::admin`]) waits for that outcome — one waiter per command in flight, so
//! at most as many as management connections.

use super::durable::Ticket;
use super::{Inner, Volume};
use crate::meta::SbChange;
use crate::replica::{Admin, Durable, Event, Outcome, Then};
use tokio::sync::oneshot;

/// A plan whose leading superblock write is staged.
pub(super) struct Staged {
    first: Option<Ticket>,
    rest: Vec<Durable>,
}

impl Volume {
    /// A management command through the node ([`Event::Admin`]): refused at once (the
    /// node's message), done at once, or done once its plan is durable and the node has
    /// done what follows (the connection renewed, the peer told, the role taken).
    pub(super) async fn admin(&self, cmd: Admin) -> Result<(), String> {
        self.admin_checked(cmd, |_| Ok(())).await
    }

    /// [`Self::admin`] after `check`, under the same lock: what only the driver knows
    /// (a frontend client holding the device open).
    pub(super) async fn admin_checked(
        &self,
        cmd: Admin,
        check: impl FnOnce(&Inner) -> Result<(), String>,
    ) -> Result<(), String> {
        match self.admin_step(cmd, check)? {
            Some(rx) => rx
                .await
                .map_err(|_| "the volume stopped before the command was done".to_string())?,
            None => Ok(()),
        }
    }

    /// A management command the node does at once (no plan: `verify`, `pause-sync`,
    /// `discard-my-data`).
    pub(super) fn admin_now(&self, cmd: Admin) -> Result<(), String> {
        if self.admin_step(cmd, |_| Ok(()))?.is_some() {
            tracing::error!("BUG: {cmd:?} asked for a plan; nobody waits for it");
        }
        Ok(())
    }

    /// Steps `cmd` under the lock and performs what follows. `Some`: the command waits
    /// ([`Outcome::Persisting`], [`Outcome::AskedPeer`]: the peer's silence is fed after
    /// the net `timeout`); its answer arrives there.
    fn admin_step(
        &self,
        cmd: Admin,
        check: impl FnOnce(&Inner) -> Result<(), String>,
    ) -> Result<Option<oneshot::Receiver<Result<(), String>>>, String> {
        let mut fx = Vec::new();
        let rx = {
            let mut g = self.lock();
            let inner = &mut *g;
            check(inner)?;
            inner.last_admin += 1;
            let reply = inner.last_admin;
            let rx = match Self::step(inner, Event::Admin { cmd, reply })? {
                Outcome::Refused(why) => return Err(why.to_string()),
                o @ (Outcome::Persisting | Outcome::AskedPeer) => {
                    if o == Outcome::AskedPeer {
                        self.peer_silent_after_timeout(reply);
                    }
                    let (tx, rx) = oneshot::channel();
                    inner.admin_replies.insert(reply, tx);
                    Some(rx)
                }
                _ => None,
            };
            self.drain(inner, &mut fx);
            rx
        };
        self.run(fx);
        Ok(rx)
    }

    /// Feeds [`Event::PeerSilent`] for command `reply` once the net `timeout` has passed
    /// (the node ignores it if the peer answered meanwhile).
    fn peer_silent_after_timeout(&self, reply: u64) {
        let timeout = self.state_timeout;
        self.spawn_task(move |me| async move {
            tokio::time::sleep(timeout).await;
            me.feed(|v, inner, fx| {
                if let Ok(Outcome::Refused(why)) = Self::step(inner, Event::PeerSilent { reply }) {
                    if let Some(tx) = inner.admin_replies.remove(&reply) {
                        let _ = tx.send(Err(format!("{why} ({timeout:?})")));
                    }
                }
                v.drain(inner, fx);
            });
        });
    }

    /// [`crate::replica::Action::Persist`]'s plan, staged by the drain: performed in a
    /// task; its outcome goes to the node ([`Event::Persisted`]) and, for a management
    /// command, to its waiter `reply`: the plan's failure (unless the node calls it best
    /// effort, [`Then::best_effort`]: logged), or the node's refusal after it.
    pub(super) fn finish_persist(&self, staged: Staged, then: Then, reply: Option<u64>) {
        self.spawn_task(move |me| async move {
            let r = me.persist_staged(staged).await.map_err(|e| {
                let what = match then {
                    Then::Invalidated => "the invalidate",
                    Then::AnnounceSkip(_) | Then::PeerSkipAdopted { .. } => {
                        "the skipped initial sync"
                    }
                    Then::Nothing | Then::NewGeneration => "the new generation",
                    Then::Promoted(_) => "the promotion in the metadata",
                    Then::Demoted { .. } => "the demotion in the metadata",
                    Then::FailureRecorded { .. } => "the failed disk",
                };
                format!("cannot record {what}: {e}")
            });
            me.feed(|v, inner, fx| {
                let ok = r.is_ok();
                let outcome = Self::step(inner, Event::Persisted { then, ok });
                v.drain(inner, fx);
                // (A failed peer write completed at last.)
                v.wake_if_idle(inner);
                let answer = match (r, outcome) {
                    (Err(e), _) if then.best_effort() => {
                        tracing::warn!("best effort: {e}");
                        Ok(())
                    }
                    (Ok(()), Ok(Outcome::Refused(why))) => Err(why.to_string()),
                    (r, _) => r,
                };
                match reply.and_then(|id| inner.admin_replies.remove(&id)) {
                    Some(tx) => {
                        let _ = tx.send(answer);
                    }
                    None => {
                        if let Err(e) = answer {
                            tracing::error!("{e}");
                        }
                    }
                }
            });
        });
    }

    /// Stages `plan`'s leading superblock step now (see the module docs).
    pub(super) fn stage_plan(&self, inner: &mut Inner, mut plan: Vec<Durable>) -> Staged {
        let first = match plan.first() {
            Some(Durable::Superblock(changes)) => {
                let t = self.stage_changes(inner, changes);
                plan.remove(0);
                Some(t)
            }
            _ => None,
        };
        Staged { first, rest: plan }
    }

    /// Stages `plan` and performs it (see the module docs); the first failure ends it.
    pub(super) async fn persist(&self, plan: Vec<Durable>) -> Result<(), String> {
        let staged = self.stage_plan(&mut self.lock(), plan);
        self.persist_staged(staged).await
    }

    /// Performs a staged plan.
    pub(super) async fn persist_staged(&self, staged: Staged) -> Result<(), String> {
        if let Some(t) = staged.first {
            self.meta.durable(t).await?;
        }
        for step in staged.rest {
            match step {
                Durable::FlushData => {
                    if !self.flush_clears().await {
                        return Err("the flush of the data disk failed".into());
                    }
                }
                Durable::Pages => self.write_dirty_pages().await?,
                Durable::Superblock(changes) => {
                    let t = self.stage_changes(&mut self.lock(), &changes);
                    self.meta.durable(t).await?;
                }
                Durable::At(d) => {
                    let t = {
                        let mut g = self.lock();
                        let Some(changes) = g.node.superblock_at(d)? else {
                            continue;
                        };
                        self.stage_changes(&mut g, &changes)
                    };
                    self.meta.durable(t).await?;
                }
                Durable::MarkClean => {
                    self.meta.settled().await?;
                    // A 32 KiB ring and a superblock, once, at the very end, off the
                    // runtime's threads (nothing else writes the metadata now).
                    let meta = self.meta.clone();
                    tokio::task::spawn_blocking(move || meta.md().mark_clean_blocking())
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| format!("cannot mark the metadata clean: {e}"))?;
                }
            }
        }
        Ok(())
    }

    /// Stages one superblock write of `changes`; a generation among them becomes the
    /// node's (logged when it changes).
    pub(super) fn stage_changes(&self, inner: &mut Inner, changes: &[SbChange]) -> Ticket {
        if let Some(uuids) = Durable::uuids(changes) {
            if uuids != inner.node.uuids {
                tracing::info!("generation UUIDs {} (were {})", uuids, inner.node.uuids);
                inner.node.uuids = uuids;
            }
        }
        self.meta.stage(changes)
    }
}
