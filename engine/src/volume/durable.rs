//! The metadata writer: makes the superblock durable off the volume's lock and off the
//! runtime's threads.
//!
//! Roles, disk states and generations change under the volume's lock, in memory, at
//! once ([`MetaWriter::stage`] applies a [`SbChange`] to the in-memory superblock and
//! returns a [`Ticket`]). One writer task per volume, started when something is staged
//! and ending when nothing is left, writes the newest staged superblock with FUA through
//! the metadata store's ring; a change staged while a write is in flight goes in the
//! next write, so a burst of changes costs at most two writes. Whoever must not go on
//! before a change is durable awaits its ticket ([`MetaWriter::durable`]):
//!
//! - a promotion takes the role only once `MDF_PRIMARY_IND` and the new generation are
//!   on disk; a demotion and the other management commands answer once theirs are;
//! - application writes: while anything staged is not yet durable, no new write enters
//!   the Primary core ([`MetaWriter::write_gate`], checked under the volume's lock where a
//!   write enters, so no write can land in a generation that is not on disk — the rule
//!   "a new generation must be on disk before anything is written in it"). If the write
//!   fails, writes fail with EIO until a later write of the superblock succeeds;
//! - the resync's steps (a SyncTarget's "not consistent" and sync UUID before its first
//!   resync write; the end of a run before `P_STATE` says UpToDate) await theirs.
//!
//! Bitmap pages are not the writer's: whoever must write pages before a flag (a
//! demotion: the bitmap, then "not Primary") writes them first and stages the flag after.
//!
//! Failure handling: a failed superblock write is an operating error (the disk's), never
//! a panic: the ticket's waiters get the error, the writer stops, and the next stage
//! tries again with the newest state. Bounds: one write in flight; the waiters are the
//! volume's own tasks (management commands ≤ 1 at a time, the writes in front of the
//! core ≤ `max-buffers`).

use crate::meta::{MetaDevice, SbChange};
use crate::store::AlignedBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::Notify;

/// What an application write finds at the gate (see [`MetaWriter::write_gate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    Open,
    Wait,
    Failed,
}

/// A staged change: durable once the writer wrote a superblock at least this new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "a staged change is durable only once its ticket is awaited"]
pub(super) struct Ticket(u64);

#[derive(Debug, Default)]
struct Gens {
    /// The newest staged state.
    staged: u64,
    /// The newest state on disk.
    durable: u64,
    /// The newest state whose write failed, and why.
    failed: u64,
    error: String,
    /// A writer task is running.
    writing: bool,
}

/// The superblock in memory and its writer (see the module docs).
pub(super) struct MetaWriter {
    me: Weak<MetaWriter>,
    md: Mutex<MetaDevice>,
    gens: Mutex<Gens>,
    /// Copies of `Gens`' numbers, for the write path's check without a lock.
    staged: AtomicU64,
    durable: AtomicU64,
    failed: AtomicU64,
    written: Notify,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for MetaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaWriter")
            .field("staged", &self.staged.load(Ordering::Relaxed))
            .field("durable", &self.durable.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl MetaWriter {
    pub(super) fn new(md: MetaDevice, rt: tokio::runtime::Handle) -> Arc<MetaWriter> {
        Arc::new_cyclic(|me| MetaWriter {
            me: me.clone(),
            md: Mutex::new(md),
            gens: Mutex::new(Gens::default()),
            staged: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            written: Notify::new(),
            rt,
        })
    }

    /// The metadata device (its in-memory superblock says the staged state). Held for
    /// microseconds: no IO happens under it.
    pub(super) fn md(&self) -> MutexGuard<'_, MetaDevice> {
        self.md
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn gens(&self) -> MutexGuard<'_, Gens> {
        self.gens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies `changes` in memory and has the writer make them durable. Cheap: callable
    /// under the volume's lock. The ticket covers every change staged before it.
    pub(super) fn stage(&self, changes: &[SbChange]) -> Ticket {
        let changed = self.md().stage(changes);
        let mut g = self.gens();
        if changed {
            g.staged += 1;
            self.staged.store(g.staged, Ordering::Release);
            if !g.writing {
                g.writing = true;
                if let Some(me) = self.me.upgrade() {
                    self.rt.spawn(async move { me.write_out().await });
                }
            }
        }
        Ticket(g.staged)
    }

    /// Whether an application write may enter the core now: every staged change is on
    /// disk (`Open`), a write of the superblock is due or in flight (`Wait`:
    /// [`Self::settled`]), or the newest one failed (`Failed`: the write fails).
    pub(super) fn write_gate(&self) -> Gate {
        let staged = self.staged.load(Ordering::Acquire);
        if self.durable.load(Ordering::Acquire) >= staged {
            Gate::Open
        } else if self.failed.load(Ordering::Acquire) >= staged {
            Gate::Failed
        } else {
            Gate::Wait
        }
    }

    /// Waits until the change of `t` (and everything staged before it) is durable; the
    /// error of the write that failed otherwise.
    pub(super) async fn durable(&self, t: Ticket) -> Result<(), String> {
        loop {
            let written = self.written.notified();
            {
                let g = self.gens();
                if g.durable >= t.0 {
                    return Ok(());
                }
                if g.failed >= t.0 {
                    return Err(format!(
                        "cannot write the metadata's superblock: {}",
                        g.error
                    ));
                }
            }
            written.await;
        }
    }

    /// Waits until the newest staged state is durable; Err if its write failed.
    pub(super) async fn settled(&self) -> Result<(), String> {
        let t = Ticket(self.gens().staged);
        self.durable(t).await
    }

    /// The writer: writes the newest staged superblock until the newest is on disk.
    async fn write_out(&self) {
        loop {
            let (gen, (offset, image)) = {
                let mut g = self.gens();
                if g.durable >= g.staged || g.failed >= g.staged {
                    g.writing = false;
                    return;
                }
                // Under `gens`, so that no stage lands between the image and its number.
                (g.staged, self.md().superblock_image())
            };
            let store = self.md().store().clone();
            let r = match AlignedBuf::from_slice(&image[..]) {
                Ok(buf) => store
                    .write(offset, Arc::new(buf), true)
                    .await
                    .map_err(|e| format!("at byte {offset}: {e}")),
                Err(e) => Err(e.to_string()),
            };
            {
                let mut g = self.gens();
                match r {
                    Ok(()) => {
                        g.durable = gen;
                        self.durable.store(gen, Ordering::Release);
                    }
                    Err(e) => {
                        tracing::error!("cannot write the metadata's superblock: {e}");
                        g.failed = gen;
                        g.error = e;
                        self.failed.store(gen, Ordering::Release);
                    }
                }
            }
            self.written.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::superblock::mdf;
    use crate::meta::{CreateOptions, MetaLocation};
    use crate::state::uuid::UuidSet;
    use crate::store::testdir::TempDir;
    use crate::store::{Store, StoreOptions};

    fn writer(dir: &TempDir) -> (Arc<MetaWriter>, Store) {
        let opts = StoreOptions {
            create_size_bytes: Some(64 << 20),
            ..StoreOptions::default()
        };
        let s = Store::open(dir.path("d"), &opts).expect("store");
        let co = CreateOptions::new(crate::meta::al::AlGeometry::default_ring());
        let md = MetaDevice::create(s.clone(), MetaLocation::Internal, &co).expect("create-md");
        (MetaWriter::new(md, tokio::runtime::Handle::current()), s)
    }

    fn on_disk(s: &Store) -> crate::meta::Superblock {
        MetaDevice::open(s.clone(), MetaLocation::Internal)
            .expect("open")
            .superblock()
            .clone()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_staged_change_is_on_disk_once_its_ticket_is_durable() {
        let dir = TempDir::new("durable");
        let (w, s) = writer(&dir);
        assert_eq!(w.write_gate(), Gate::Open);
        let uuids = UuidSet {
            current: 0x1111,
            bitmap: 0x2222,
            history: [0x3333, 0x4444],
        };
        let t1 = w.stage(&[SbChange::Primary(true)]);
        let t2 = w.stage(&[SbChange::Uuids(uuids)]);
        assert!(t2 > t1);
        // In memory at once; not on disk, and writes wait at the gate.
        assert_ne!(w.md().superblock().flags & mdf::PRIMARY_IND, 0);
        assert_eq!(on_disk(&s).flags & mdf::PRIMARY_IND, 0);
        assert_eq!(w.write_gate(), Gate::Wait);
        w.durable(t2).await.expect("durable");
        assert_eq!(w.write_gate(), Gate::Open);
        let sb = on_disk(&s);
        assert_ne!(sb.flags & mdf::PRIMARY_IND, 0);
        assert_eq!(
            (
                sb.current_uuid,
                sb.peers[0].bitmap_uuid,
                sb.history_uuids[0]
            ),
            (0x1111, 0x2222, 0x3333)
        );
        // The earlier ticket is covered by the later write.
        w.durable(t1).await.expect("durable");
        // Staging what is already there writes nothing and waits for nothing.
        let t3 = w.stage(&[SbChange::Primary(true)]);
        assert_eq!(t3, t2);
        assert_eq!(w.write_gate(), Gate::Open);
        // A burst is coalesced: at most the one in flight and one more.
        let mut last = t3;
        for i in 0..100u64 {
            last = w.stage(&[SbChange::Uuids(UuidSet {
                current: 0x1000 + i,
                ..uuids
            })]);
        }
        w.settled().await.expect("settled");
        assert!(w.durable(last).await.is_ok());
        assert_eq!(on_disk(&s).current_uuid, 0x1000 + 99);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_write_reaches_its_waiters_and_closes_the_gate() {
        let dir = TempDir::new("durable-fail");
        let (w, s) = writer(&dir);
        s.close();
        let t = w.stage(&[SbChange::Consistent(true)]);
        let e = w.durable(t).await.expect_err("the store is closed");
        assert!(e.contains("superblock"), "{e}");
        assert_eq!(w.write_gate(), Gate::Failed);
        assert!(w.settled().await.is_err());
        // The next change tries again (and fails again here, and says so).
        let t = w.stage(&[SbChange::Primary(true)]);
        assert_eq!(w.write_gate(), Gate::Wait);
        assert!(w.durable(t).await.is_err());
    }
}
