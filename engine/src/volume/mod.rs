//! The volume driver: runs the sans-IO replication core against the real disk and the
//! real connection.
//!
//! One [`Volume`] per resource. It holds the replica's [`Node`] (`replica::Node`: the
//! [`Primary`] write pipeline and the [`Receiver`] — which one is used depends on the
//! role —, the resync runs, the flush rounds, the role, disk state and UUIDs), the
//! backing [`Store`], and the sending side of the current connection ([`Link`]). There
//! is no actor task: whichever task has an event (an NBD request, a store completion, a
//! packet from the peer) locks the volume for a few microseconds, feeds the event to the
//! node, and turns the node's actions (`Volume::drain`) into IO:
//!
//! - **sends** (`P_DATA`, `P_BARRIER`, acks) are queued on the connection's bounded send
//!   queues *while the lock is held*, so they reach each socket in the order the core
//!   emitted them (a barrier between two epochs' writes; a write ack before its epoch's
//!   barrier ack);
//! - **disk IO** and **completions** run after the lock is released. Local writes,
//!   discards, flushes, metadata writes and resync IO are submitted to the store from
//!   the thread that ran the core (no task), and the store's reaper feeds the result
//!   back from its thread (`io.rs`: a completion sink, a preallocated table of the ops
//!   in flight); the rare rest (the failure record, writes to a detached disk) are
//!   tasks that re-enter the core with their result.
//!
//! Resync, online verify and the reads of a SyncTarget Primary from its peer are in
//! `sync.rs`: the same pattern, with the `resync` machines instead of the cores.
//!
//! **Metadata** (roles, UUIDs, disk-state flags) changes in memory under the lock and is
//! made durable by the metadata writer (`durable.rs`) off the lock and off the runtime
//! thread; what must not happen before it is durable waits for its ticket (a promotion
//! takes the role after, application writes wait at the core's door), so no disk IO
//! ever runs under the lock. The node has **one bitmap**, in the Primary core; a
//! SyncTarget's run borrows it per call, and every page of it that is written goes
//! through the page writer (`pages.rs`: images staged under the lock, one write per
//! page in flight, the newest image next), so no older image lands after a newer one.
//!
//! **Diskless Primary** (`on-io-error detach` on a Primary, DRBD's diskless Primary): a
//! failed local write makes the Primary `Diskless` ([`Primary::detach_local`]): writes go
//! to the peer only and succeed only once the peer has them; reads go to the peer
//! (`P_DATA_REQUEST`, ≤ `MAX_REMOTE_READS` = 1,024 in flight) while it is connected and
//! UpToDate, else EIO. Re-attaching must resync everything it missed. Two records do
//! that, and both are kept:
//! - the failure record sets the peer slot's `MDF_PEER_FULL_SYNC` (with `MDF_CONSISTENT`
//!   cleared), and the next attach sets every bit: the only record that covers the writes
//!   sent before the peer learned of the detach (the peer applied them as ordinary
//!   writes, and the Diskless node's own bitmap lives in memory only — its metadata is
//!   on the failed disk). It is best effort: that disk just failed a write;
//! - the peer marks out of sync every write it applies while this node's disk is below
//!   Inconsistent (DRBD's `receive_Data`): cheap, it keeps the peer's bitmap and status
//!   honest (the blocks the Diskless node lacks), and if the full-sync flag could not be
//!   written it still covers every write after the `P_STATE` (the attach also comes back
//!   without `MDF_CONSISTENT` only if that write landed; a disk that takes no metadata
//!   write at all needs `create-md` and a full sync anyway). Those bits reach the peer's
//!   disk at its clean stop or a later bitmap write-back (no activity log on a
//!   Secondary), so alone they would not survive a crash of the peer.
//!
//! Bounds: requests from frontends in flight ≤ `max-buffers` (a semaphore in front of
//! the core, so the core never says Busy); a frontend write larger than
//! [`MAX_WRITE_CHUNK`] (1 MiB, DRBD's largest bio) is split into 1 MiB requests; a
//! discard or write-zeroes over [`MAX_BATCH_CHUNK`] (128 MiB, DRBD's batch limit) is
//! refused (frontends split them, as `TargetInfo` tells them). The
//! Secondary's held writes are bounded by the core (`max_held`); when it is full the data
//! socket's reader stops reading, which back-pressures the peer through TCP.

use crate::config::{Config, NodeConfig};
use crate::frontend::{BlockError, BlockIo, BlockReply, BlockTarget, Openers, TargetInfo};
use crate::meta::disk::{Attach, MetaDevice};
use crate::net::handshake::{Agreed, PeerParams};
use crate::net::{Link, PeerData, PeerWrite, PeerWriteKind, SendError, SourceStart, Stream};
use crate::replica::{
    Action, Admin, DiskFailure, Event, Io, LocalWrite, Node, Outcome, Side, StartupRefusal,
    StepError, Up,
};
use crate::request::{
    self, Error as CoreError, MetaConfig, OutOfSync, Primary, PrimaryConfig, Receiver,
    ReceiverConfig, WriteKind,
};
use crate::state::uuid::{random_uuid, UuidSet};
use crate::state::{DiskState, Protocol, Role};
use crate::store::{AlignedBuf, Store, SECTOR_SIZE};
use crate::wire::{self, Command, Packet};
use durable::{Gate, MetaWriter};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify, Semaphore};

mod durable;
mod io;
mod pages;
mod peer_wait;
mod plan;
mod port;
mod reply;
mod sync;
#[cfg(test)]
mod tests;

pub use sync::SyncSettings;

/// Largest write handed to the core (and sent as one `P_DATA`): DRBD_MAX_BIO_SIZE.
pub(crate) const MAX_WRITE_CHUNK: usize = 1 << 20;
/// Largest discard / write-zeroes handed to the core: DRBD_MAX_BATCH_BIO_SIZE.
pub(crate) const MAX_BATCH_CHUNK: u64 = 128 << 20;

/// Bytes of peer write data held in memory at once (received and not yet on disk):
/// the Secondary's buffer bound. A data packet waits for room before it is read, which
/// back-pressures the peer through TCP.
pub(crate) const PEER_DATA_BUDGET: usize = 64 << 20;

struct Pending {
    buf: Option<Arc<AlignedBuf>>,
    /// Where the result goes; a `Pending` leaves `Inner::pending` only when the core
    /// completes it (or when the core refused it at once, see `core_request`).
    done: Option<Done>,
}

/// Where a frontend request's result goes: a preallocated reply slot (`reply.rs`), or a
/// `oneshot` when all slots are taken.
enum Done {
    Slot(u32),
    Oneshot(oneshot::Sender<Result<(), BlockError>>),
}

/// The waiting side of [`Done`].
enum Waiter {
    Slot(u32),
    Oneshot(oneshot::Receiver<Result<(), BlockError>>),
}

struct Inner {
    /// Every bitmap page write goes through it (`pages.rs`).
    pages: pages::PageWriter,
    shutting_down: bool,
    link: Option<Link>,
    kill: Option<Arc<Notify>>,
    /// The replica node: both cores (the Primary's holds the one bitmap), the resync
    /// runs, the flush rounds, the role, the disk state and the generation UUIDs (each
    /// UUID change staged in the superblock, see `durable.rs`). Its rules are
    /// `replica::Node`'s; this driver performs its actions.
    node: Node,
    /// Reused buffer the node's actions are drained into (no allocation per event).
    actions: Vec<Action>,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    peer_bufs: HashMap<u64, PeerData>,
    bytes_replicated: u64,
    writes_completed: u64,
    /// Why the last handshake found a split brain (cleared by `connect`).
    split_brain: Option<String>,
    /// Source read buffers waiting for their `P_RS_DATA_REPLY`, by tag.
    rs_bufs: HashMap<u64, Arc<AlignedBuf>>,
    /// The last finished SyncTarget run.
    last_sync: Option<crate::resync::ResyncSummary>,
    /// Management commands waiting for their plan to be durable or for the peer's
    /// answer (`plan.rs`), by handle.
    admin_replies: HashMap<u64, oneshot::Sender<Result<(), String>>>,
    /// The last handle given to a management command.
    last_admin: u64,
    /// Sectors of non-resync IO on the backing device (c-min-rate).
    app_io_sectors: u64,
    /// Resync data bytes sent (`P_RS_DATA_REPLY`).
    resync_bytes_sent: u64,
    /// How the last split brain was resolved.
    split_brain_resolved: Option<String>,
    /// The last finished (or interrupted) verify.
    last_verify: Option<crate::resync::VerifyProgress>,
    /// Reads sent to the peer (`P_DATA_REQUEST`), by block id.
    remote_reads: HashMap<u64, RemoteRead>,
    /// Next `P_DATA_REQUEST` block id.
    next_read_id: u64,
    /// Thin resync requests answered from a file hole without reading.
    hole_reads_skipped: u64,
    /// The last [`MAX_EVENTS`] state events (DRBD's `events2`, in short).
    events: std::collections::VecDeque<serde_json::Value>,
    /// Sequence number of the next event.
    event_seq: u64,
    /// This node holds `RESOLVE_CONFLICTS` on the live connection.
    resolve_conflicts: bool,
    /// What the configured `role` did at start (status `startup_role`).
    startup_role: Option<String>,
    /// Why the peer's disk left service while connected (status `peer_disk_failure`).
    peer_disk_failure: Option<String>,
    /// Why this node's disk left service (status `disk_failure`).
    disk_failure: Option<String>,
    /// When each write still awaiting the peer was queued (`net::liveness`).
    peer_waits: peer_wait::PeerWaits,
}

/// Events kept for `tandem events`.
pub const MAX_EVENTS: usize = 256;

/// The longest a connection that this node ends on purpose right after queueing packets
/// (a state change reply, a `P_NEG_ACK`, a `P_STATE`) waits for them to reach the
/// socket (`Link::sent` says when; a local socket write takes microseconds, a peer that
/// stopped reading is bounded here).
const QUEUED_PACKETS_LEAVE: Duration = Duration::from_millis(200);

impl Inner {
    /// Records a state event: `kind` (a word like `split-brain`) and its details.
    fn event(&mut self, kind: &str, detail: serde_json::Value) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.events.push_back(serde_json::json!({
            "seq": self.event_seq,
            "unix_ms": ms,
            "event": kind,
            "detail": detail,
        }));
        self.event_seq += 1;
    }
}

/// IO to start after the lock is released.
enum Effect {
    /// A core's write to the local disk, with its data.
    LocalWrite {
        w: LocalWrite,
        buf: Option<Buf>,
    },
    PrimaryFlush {
        tag: u64,
    },
    MetaWrite(io::MetaJob),
    /// Flush the disk for a round of merged Secondary epoch flushes (`Inner::flushes`).
    FlushRound,
    SyncRead(crate::replica::RunRead),
    SyncWrite {
        run: u64,
        tag: u64,
        sector: u64,
        len: u32,
        /// `None`: write zeroes.
        data: Option<PeerData>,
    },
    SyncBitmap,
    /// Record the end of a target run (`replica::Node::target_end`).
    SyncFinish(crate::replica::TargetEnd),
    /// [`Action::RenewForResync`] on connection `session`.
    RenewForResync {
        session: u64,
        target: bool,
    },
    /// [`Action::DetachedStandAlone`].
    DetachedStandAlone,
    /// [`Action::Persist`]'s plan, staged (`plan.rs`).
    Persist {
        staged: plan::Staged,
        then: crate::replica::Then,
        reply: Option<u64>,
    },
    Complete {
        done: Done,
        result: Result<(), BlockError>,
    },
}

/// A read this node asked its peer for (`P_DATA_REQUEST`): the bytes it asked for, and
/// where the reply goes.
struct RemoteRead {
    len: u32,
    done: oneshot::Sender<Result<AlignedBuf, BlockError>>,
}

impl RemoteRead {
    /// Its `P_DATA_REPLY` arrived with `buf`: handed to the reader if it is exactly the
    /// bytes asked for; otherwise the read fails (EIO) and the error says why (a short
    /// reply would reach the application as if read).
    fn complete(self, buf: AlignedBuf) -> Result<(), String> {
        if buf.len() != self.len as usize {
            let _ = self.done.send(Err(BlockError::Io));
            return Err(format!(
                "P_DATA_REPLY of {} bytes for a read of {}",
                buf.len(),
                self.len
            ));
        }
        let _ = self.done.send(Ok(buf));
        Ok(())
    }
}

/// One replicated volume.
pub struct Volume {
    me: Weak<Volume>,
    resource: String,
    node: String,
    peer_node: String,
    protocol: Protocol,
    size_bytes: u64,
    store: Store,
    /// The metadata's device: `store` itself for internal metadata.
    meta_store: Store,
    /// The superblock and layout (role flags, UUIDs, the clean stop), made durable by
    /// its writer off the lock (`durable.rs`).
    meta: Arc<MetaWriter>,
    /// Resync settings.
    sync: SyncSettings,
    /// `max-buffers`.
    max_buffers: usize,
    /// Origin of the resync machines' clock.
    started: Instant,
    /// Bytes written to the replication sockets after the handshake (all connections).
    net_tx_bytes: std::sync::atomic::AtomicU64,
    /// Why the last connection attempt failed, and when (Unix seconds); see
    /// [`Volume::set_connection_error`].
    conn_error: std::sync::Mutex<Option<(String, u64)>>,
    slots: Arc<Semaphore>,
    peer_data: Arc<Semaphore>,
    /// Reads the peer asked for (`P_DATA_REQUEST`) in flight here.
    peer_reads: Arc<Semaphore>,
    accept: Notify,
    conn_changed: Notify,
    /// A write retired: the core may accept again (see `core_request`).
    core_room: Notify,
    /// A connection finished its handshake.
    link_up: Notify,
    /// The resync runs and the peer's writes on the disk became idle (see
    /// `wait_sync_io_idle`), notified only while `idle_wanted`.
    sync_io_idle: Notify,
    /// A new connection waits for `sync_io_idle` (so a peer write's completion costs one
    /// atomic load, not a notify, the rest of the time).
    idle_wanted: std::sync::atomic::AtomicBool,
    /// A resync or verify run started: the connection's resync clock runs again.
    sync_run_started: Notify,
    /// How long a state change request waits for the peer (DRBD's `timeout`).
    state_timeout: Duration,
    /// What a failed local write does (`disk.on-io-error`).
    on_io_error: crate::config::OnIoError,
    /// One role change (or `new-current-uuid`) at a time: the node refuses a second one
    /// while the first is under way (`replica/role_cmd.rs`); this makes it wait instead.
    role_change: tokio::sync::Mutex<()>,
    /// The disk is detached (`on-io-error detach` after a failed write): no write is
    /// submitted to it any more. An atomic, so the write path takes no extra lock.
    detached: std::sync::atomic::AtomicBool,
    /// The frontends' clients that have the volume open for writing (`secondary` refuses
    /// while there are any, unless forced).
    openers: Arc<Openers>,
    /// The runtime the volume's background IO runs on (store completions, the local
    /// part of a write): a frontend request submitted from a thread outside any runtime
    /// (a ublk queue thread) starts its tasks here.
    rt: tokio::runtime::Handle,
    /// The local IO in flight through the store's completion sink (`io.rs`).
    io_ops: Mutex<io::IoTable>,
    /// Frontend requests' results (`reply.rs`).
    replies: reply::Replies,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("resource", &self.resource)
            .field("node", &self.node)
            .finish()
    }
}

/// The Primary core of a volume of `sectors` with the metadata `layout`.
fn primary_core(
    config: &Config,
    sectors: u64,
    layout: &crate::meta::Layout,
) -> anyhow::Result<Primary> {
    let ring_offset = layout
        .al_block_offset(0)
        .ok_or_else(|| anyhow::anyhow!("metadata layout without an activity log"))?;
    let bitmap_offset = layout
        .bm_page_offset(0)
        .ok_or_else(|| anyhow::anyhow!("metadata layout without a bitmap"))?;
    let max_buffers = config.net.max_buffers as usize;
    let mut pcfg = PrimaryConfig::new(config.resource.protocol, sectors);
    pcfg.max_in_flight = max_buffers;
    pcfg.max_unacked_writes = max_buffers * 2;
    pcfg.max_epoch_size = config.net.max_epoch_size;
    pcfg.first_barrier_nr = rand::random::<u32>().max(1);
    pcfg.meta = Some(MetaConfig::new(
        layout.al,
        config.disk.al_extents,
        ring_offset,
        bitmap_offset,
    ));
    Primary::new(pcfg).map_err(|e| anyhow::anyhow!("replication core: {e}"))
}

impl Inner {
    /// A Secondary's state, not connected, over its cores and what the metadata says.
    fn new(
        primary: Primary,
        receiver: Receiver,
        disk: DiskState,
        uuids: UuidSet,
        crashed_primary: bool,
    ) -> Self {
        let base = primary
            .config()
            .meta
            .as_ref()
            .map_or(0, |m| m.bitmap_offset);
        let npages = if primary.config().meta.is_some() {
            primary.out_of_sync().pages()
        } else {
            0
        };
        let mut node = Node::new(primary, receiver, uuids, disk);
        node.crashed_primary = crashed_primary;
        Inner {
            pages: pages::PageWriter::new(base, npages),
            shutting_down: false,
            link: None,
            kill: None,
            node,
            actions: Vec::new(),
            next_id: 1,
            pending: HashMap::new(),
            peer_bufs: HashMap::new(),
            bytes_replicated: 0,
            writes_completed: 0,
            split_brain: None,
            rs_bufs: HashMap::new(),
            last_sync: None,
            admin_replies: HashMap::new(),
            last_admin: 0,
            app_io_sectors: 0,
            resync_bytes_sent: 0,
            split_brain_resolved: None,
            last_verify: None,
            remote_reads: HashMap::new(),
            next_read_id: 1,
            hole_reads_skipped: 0,
            events: std::collections::VecDeque::new(),
            event_seq: 0,
            resolve_conflicts: false,
            startup_role: None,
            peer_disk_failure: None,
            disk_failure: None,
            peer_waits: peer_wait::PeerWaits::default(),
        }
    }
}

impl Volume {
    /// A volume over `store` with its attached metadata `md` (see
    /// [`MetaDevice::attach_blocking`]), Secondary and not connected. The data area is the
    /// metadata's last agreed size.
    pub fn new(
        config: &Config,
        me: &NodeConfig,
        peer: &NodeConfig,
        store: Store,
        md: MetaDevice,
        attach: Attach,
    ) -> anyhow::Result<Arc<Volume>> {
        let sectors = md.superblock().effective_size;
        let size_bytes = sectors * SECTOR_SIZE as u64;
        if size_bytes == 0 || size_bytes > store.size_bytes() {
            anyhow::bail!(
                "disk {}: the metadata's data area ({size_bytes} bytes) does not fit the {} byte \
                 device",
                me.disk.display(),
                store.size_bytes()
            );
        }
        let max_buffers = config.net.max_buffers as usize;
        let mut primary = primary_core(config, sectors, md.layout())?;
        primary
            .load_bitmap(OutOfSync::from_disk(sectors, &attach.bitmap))
            .map_err(|e| anyhow::anyhow!("loading the bitmap: {e}"))?;
        let meta_store = md.store().clone();
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            anyhow::anyhow!("Volume::new runs inside the tokio runtime its IO will use")
        })?;
        store.set_runtime(&rt);
        meta_store.set_runtime(&rt);
        // Set by this attach's log replay, or still set from an earlier one whose resync
        // did not complete.
        let crashed_primary = attach.crashed_primary() || md.is_crashed_primary();
        let sb = md.superblock();
        let uuids = UuidSet {
            current: sb.current_uuid,
            bitmap: sb.peers[0].bitmap_uuid,
            history: [sb.history_uuids[0], sb.history_uuids[1]],
        };
        let mut rcfg = ReceiverConfig::new(sectors);
        rcfg.max_active = max_buffers;
        let receiver = Receiver::new(rcfg).map_err(|e| anyhow::anyhow!("receiver core: {e}"))?;
        // MDF_CONSISTENT: what a restart in the middle of a resync, or create-md on a
        // device with unknown contents, leaves unset.
        let disk = if md.is_consistent() {
            DiskState::UpToDate
        } else {
            DiskState::Inconsistent
        };
        Ok(Arc::new_cyclic(|me_weak| Volume {
            me: me_weak.clone(),
            resource: config.resource.name.clone(),
            node: me.name.clone(),
            peer_node: peer.name.clone(),
            protocol: config.resource.protocol,
            size_bytes,
            store,
            meta_store,
            meta: MetaWriter::new(md, rt.clone()),
            sync: SyncSettings::from_config(config),
            max_buffers,
            started: Instant::now(),
            net_tx_bytes: std::sync::atomic::AtomicU64::new(0),
            conn_error: std::sync::Mutex::new(None),
            slots: Arc::new(Semaphore::new(max_buffers)),
            peer_data: Arc::new(Semaphore::new(PEER_DATA_BUDGET / SECTOR_SIZE)),
            peer_reads: Arc::new(Semaphore::new(sync::MAX_PEER_READS)),
            accept: Notify::new(),
            conn_changed: Notify::new(),
            core_room: Notify::new(),
            link_up: Notify::new(),
            sync_io_idle: Notify::new(),
            idle_wanted: std::sync::atomic::AtomicBool::new(false),
            sync_run_started: Notify::new(),
            state_timeout: config.net.timeout.max(Duration::from_millis(100)),
            on_io_error: config.disk.on_io_error,
            role_change: tokio::sync::Mutex::new(()),
            detached: std::sync::atomic::AtomicBool::new(false),
            openers: Arc::new(Openers::default()),
            rt,
            io_ops: Mutex::new(io::IoTable::new(max_buffers)),
            replies: reply::Replies::new(max_buffers.saturating_mul(2)),
            inner: Mutex::new({
                let mut inner = Inner::new(primary, receiver, disk, uuids, crashed_primary);
                inner.node.detach_on_io_error =
                    config.disk.on_io_error == crate::config::OnIoError::Detach;
                inner
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug that already aborted a task; the state
        // machine itself never leaves a half-applied input (its inputs are atomic).
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Exported size, bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    // ----- role and connection state --------------------------------------------------

    /// `secondary [--force]`: refused while a frontend client has the device open for
    /// writing (DRBD's "held open"), unless `force`. The rest is the node's
    /// ([`Admin::Demote`], `replica/role_cmd.rs`): the role at once, then the data disk
    /// flushed, the bitmap pages and "not Primary" with the demoted UUIDs durable; on a
    /// failure the disk goes out of use (a Diskless Primary's: best effort). One role
    /// change at a time (`role_change`).
    pub async fn demote(&self, force: bool) -> Result<(), String> {
        let _one = self.role_change.lock().await;
        self.admin_checked(Admin::Demote, |inner| {
            // DRBD's "held open" (SS_DEVICE_IN_USE): a client could still write.
            if let Some(held) = self.openers.held_open().filter(|_| !force) {
                return Err(format!(
                    "the device is {held}; disconnect them first, or `secondary --force` \
                     (their next writes then fail with EPERM)"
                ));
            }
            if inner.node.role == Role::Primary && !inner.pending.is_empty() {
                return Err("writes are in flight; stop the application first".into());
            }
            Ok(())
        })
        .await
    }

    /// `primary [--force]`: becomes Primary, through the node ([`Admin::Promote`],
    /// `replica/role_cmd.rs`). While connected the peer is asked first (DRBD's
    /// cluster-wide state change, `state::change`): the promotion happens only if it
    /// agrees, so two nodes told `primary` at the same instant never both become
    /// Primary; a peer silent for the net `timeout` is dropped. `force` promotes a disk
    /// that is not UpToDate (DRBD's `primary --force`): its data becomes the good copy,
    /// in a new generation, and a connected peer is resynced from it (the connection is
    /// renewed so that the handshake decides it). The promotion completes even if its
    /// caller goes away. One role change at a time (`role_change`).
    pub async fn promote(&self, force: bool) -> Result<(), String> {
        let _one = self.role_change.lock().await;
        let random = {
            let mut rng = rand::thread_rng();
            [random_uuid(&mut rng), random_uuid(&mut rng)]
        };
        self.admin(Admin::Promote { force, random }).await
    }

    /// The configured `role = "primary"` at start (DRBD's `become-primary-on` intent,
    /// made safe). The node starts Secondary and waits up to `wfc_timeout` (DRBD's
    /// `wfc-timeout`; zero = forever) for its peer:
    ///
    /// - connected: it asks the peer to become Primary ([`Self::promote`]); a peer that
    ///   is Primary now (a switchover happened while this node was down) keeps its role
    ///   and this node stays Secondary;
    /// - no peer in time: it promotes alone only if its UUIDs say it wrote last without
    ///   its peer (a bitmap UUID: it was a Primary that lost its peer, so the peer never
    ///   had these writes and cannot have taken over from them); otherwise it stays
    ///   Secondary, since the peer may be Primary now, and the operator decides.
    ///
    /// The rule is the node's ([`Node::startup_refusal`]); decided once; the outcome is
    /// in status (`startup_role`), the log and the events.
    pub async fn become_primary_at_start(&self, wfc_timeout: Duration) {
        let deadline = (!wfc_timeout.is_zero()).then(|| tokio::time::Instant::now() + wfc_timeout);
        let connected = loop {
            let up = self.link_up.notified();
            if self.lock().link.is_some() {
                break true;
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, up).await.is_err() {
                        break false;
                    }
                }
                None => up.await,
            }
        };
        let (refusal, split_brain) = {
            let g = self.lock();
            let sb = g.split_brain.clone();
            (g.node.startup_refusal(connected, sb.is_some()), sb)
        };
        let outcome = match refusal {
            Some(StartupRefusal::SplitBrain) => Err(format!(
                "the peer was met and the handshake found a split brain ({}); staying \
                 Secondary until the operator resolves it",
                split_brain.unwrap_or_default()
            )),
            Some(StartupRefusal::PeerPrimary) => Err(
                "the peer is Primary now; staying Secondary (`tandem primary` after it \
                 is demoted)"
                    .to_string(),
            ),
            Some(StartupRefusal::NotLastPrimary) => Err(format!(
                "no peer within wfc-timeout ({wfc_timeout:?}) and this node's UUIDs do not \
                 say it was the last Primary (the peer may be Primary now); staying \
                 Secondary: `tandem primary` promotes it if the peer is gone"
            )),
            None => self.promote(false).await,
        };
        let text = match &outcome {
            Ok(()) if connected => "promoted: connected, the peer agreed".to_string(),
            Ok(()) => "promoted alone after wfc-timeout: this node wrote last".to_string(),
            Err(e) => format!("not promoted: {e}"),
        };
        match &outcome {
            Ok(()) => tracing::info!("configured role primary: {text}"),
            Err(_) => tracing::warn!("configured role primary: {text}"),
        }
        let mut g = self.lock();
        g.event("startup-role", serde_json::json!({ "outcome": text }));
        g.startup_role = Some(text);
    }

    /// Tells the log and the events of a new role ([`Action::RoleChanged`]).
    fn role_logged(inner: &mut Inner, role: Role) {
        tracing::info!("role is now {role}");
        inner.event("role", serde_json::json!({ "role": role }));
    }

    /// The Primary core's dirty bitmap pages, taken and written (FUA) through the page
    /// writer (`pages.rs`); done when each is durable.
    async fn write_dirty_pages(&self) -> Result<(), String> {
        let (waits, fx) = Self::stage_dirty_pages(&mut self.lock());
        self.run(fx);
        Self::pages_durable(waits).await
    }

    /// Takes the dirty bitmap pages and stages them with the page writer (under the
    /// lock, so the images go to disk in the order they were taken): the waits, and the
    /// writes to start.
    fn stage_dirty_pages(inner: &mut Inner) -> (Vec<oneshot::Receiver<bool>>, Vec<Effect>) {
        let mut waits = Vec::new();
        let mut fx = Vec::new();
        for (offset, data) in inner.node.primary.take_dirty_bitmap_pages() {
            let Some(page) = inner.pages.page_at(offset) else {
                panic!("BUG: the core's bitmap page at byte {offset} is outside the bitmap");
            };
            let (tx, rx) = oneshot::channel();
            waits.push(rx);
            let w = pages::PageWaiter::Task(tx);
            if let Some(job) = inner.pages.stage(page, data, false, w) {
                fx.push(Effect::MetaWrite(job));
            }
        }
        (waits, fx)
    }

    /// Waits until every staged page is durable.
    async fn pages_durable(waits: Vec<oneshot::Receiver<bool>>) -> Result<(), String> {
        let mut failed = 0;
        for rx in waits {
            if !rx.await.unwrap_or(false) {
                failed += 1;
            }
        }
        match failed {
            0 => Ok(()),
            n => Err(format!("{n} bitmap page write(s) failed")),
        }
    }

    /// A metadata write of the Primary core: a bitmap page goes through the page writer,
    /// an activity-log transaction to the disk once no page write is in flight
    /// (`pages.rs`).
    fn core_meta_write(
        inner: &mut Inner,
        fx: &mut Vec<Effect>,
        tag: u64,
        offset: u64,
        data: Box<[u8; 4096]>,
        preflush: bool,
    ) {
        match inner.pages.page_at(offset) {
            Some(page) => {
                let w = pages::PageWaiter::Core(tag);
                if let Some(job) = inner.pages.stage(page, data, preflush, w) {
                    fx.push(Effect::MetaWrite(job));
                }
            }
            None => {
                let m = io::MetaJob {
                    tag: io::MetaTag::Core(tag),
                    offset,
                    data,
                    preflush,
                };
                if let Some(m) = inner.pages.after_pages(m) {
                    fx.push(Effect::MetaWrite(m));
                }
            }
        }
    }

    /// A bitmap page write ended: its waiters are told, the page's next image goes.
    fn page_write_done(inner: &mut Inner, fx: &mut Vec<Effect>, page: u32, ok: bool) {
        if !ok {
            // Its image is not on disk: the next writer of the page writes it again.
            inner.node.primary.out_of_sync_mut().set_dirty(page);
        }
        let d = inner.pages.done(page, ok);
        for m in d.released {
            if d.released_ok {
                fx.push(Effect::MetaWrite(m));
            } else {
                tracing::error!(
                    "a bitmap page write failed: the activity-log write after it fails"
                );
                let io::MetaTag::Core(tag) = m.tag else {
                    panic!("BUG: a bitmap page write was held as a transaction");
                };
                contract(inner.node.primary.meta_write_done(tag, false));
            }
        }
        let (waiters, next) = (d.waiters, d.next);
        for w in waiters {
            match w {
                pages::PageWaiter::Core(tag) => {
                    contract(inner.node.primary.meta_write_done(tag, ok))
                }
                pages::PageWaiter::Task(tx) => {
                    let _ = tx.send(ok);
                }
            }
        }
        if let Some(job) = next {
            fx.push(Effect::MetaWrite(job));
        }
    }

    /// The handshake found a split brain (or unrelated data): stay StandAlone until the
    /// operator connects again, and show why in status.
    fn split_brain(&self, why: String) {
        {
            let mut g = self.lock();
            g.event("split-brain", serde_json::json!({ "why": why }));
            g.split_brain = Some(why);
        }
        self.set_standalone(true);
    }

    /// The recorded events with a sequence number ≥ `since`.
    pub fn events(&self, since: u64) -> Vec<serde_json::Value> {
        self.lock()
            .events
            .iter()
            .filter(|e| e["seq"].as_u64().is_some_and(|s| s >= since))
            .cloned()
            .collect()
    }

    /// Enters or leaves StandAlone (`disconnect` / `connect`).
    pub fn set_standalone(&self, standalone: bool) {
        let kill = {
            let mut g = self.lock();
            g.node.standalone = standalone;
            if !standalone {
                g.split_brain = None;
            }
            if standalone {
                g.kill.clone()
            } else {
                None
            }
        };
        if let Some(k) = kill {
            k.notify_one();
        }
        self.conn_changed.notify_waiters();
    }

    /// True while the operator wants no connection.
    pub fn is_standalone(&self) -> bool {
        self.lock().node.standalone
    }

    /// A connection finished its handshake. Returns the notify that kills it. A
    /// SyncSource's first packets are those of `source` (`replica::Node::source_start`), queued
    /// under the same lock as the step that makes the Primary replicate.
    fn connection_up(
        &self,
        link: Link,
        peer: &PeerParams,
        agreed: &Agreed,
        resolve_conflicts: bool,
        source: Option<SourceStart>,
    ) -> Arc<Notify> {
        let kill = Arc::new(Notify::new());
        let mut effects = Vec::new();
        {
            let mut g = self.lock();
            let inner = &mut *g;
            if let Some(start) = source {
                let pkts = inner.node.source_start(&start.known, start.sync_uuid);
                if pkts.len() > 1 {
                    tracing::info!(
                        "{} ranges written during the bitmap exchange told by P_OUT_OF_SYNC",
                        pkts.len() - 1
                    );
                }
                if let Err(e) = link.send_all(Stream::Data, &pkts) {
                    // The connection is ending; the next one exchanges bitmaps again.
                    tracing::warn!("cannot start the resync: {e}");
                    kill.notify_one();
                }
            }
            inner.link = Some(link);
            inner.resolve_conflicts = resolve_conflicts;
            if peer.disk > DiskState::Failed {
                // The peer's disk is back (re-attached): its failure is history (events).
                inner.peer_disk_failure = None;
            }
            inner.kill = Some(kill.clone());
            let version = inner.link.as_ref().map_or(0, |l| l.ctx().version());
            inner.node.peer_started = self.peer_started_runs(inner);
            let role = inner.node.sync_role(
                agreed.sync,
                self.sync.csums && peer.csums,
                self.sync.csums_after_crash_only,
                peer.side.crashed_primary,
            );
            inner.event(
                "connected",
                serde_json::json!({ "peer": self.peer_node, "sync": format!("{:?}", agreed.sync) }),
            );
            let bits = inner.node.primary.out_of_sync().count();
            if role.is_none() && bits > 0 {
                // DRBD's "No resync, but N bits in bitmap!": the UUIDs say equal (e.g.
                // verify marked blocks and no Primary started a new generation).
                tracing::warn!(
                    "no resync, but {bits} blocks are marked out of sync; a disconnect/connect \
                     of a Primary resyncs them"
                );
            }
            let run = role.map(|r| self.run_start(inner, r, peer));
            let up = Up {
                version,
                peer_role: peer.role,
                peer_disk: peer.disk,
                run,
                peer_verify: peer.verify,
                tick: self.tick_input(inner),
            };
            match Self::step(inner, Event::ConnectionUp(up)) {
                Ok(_) => {
                    if let Some(start) = &run {
                        self.run_started(inner, start);
                    }
                }
                Err(why) => {
                    tracing::error!("{why}; dropping the connection");
                    kill.notify_one();
                }
            }
            self.drain(inner, &mut effects);
        }
        self.run(effects);
        self.link_up.notify_waiters();
        kill
    }

    /// The connection `session` is gone: writes not barrier-acked become out of sync.
    fn connection_lost(&self, session: u64) {
        let mut effects = Vec::new();
        {
            let mut g = self.lock();
            let inner = &mut *g;
            if inner.link.as_ref().is_none_or(|l| l.session() != session) {
                return;
            }
            inner.link = None;
            inner.kill = None;
            // (A Primary that lost its peer's disk writes a generation the peer lacks.)
            self.node_connection_lost(inner, &mut effects);
            let oos = inner.node.primary.out_of_sync_bytes();
            if oos > 0 {
                tracing::warn!(
                    "peer {} disconnected; {oos} bytes out of sync",
                    self.peer_node
                );
            }
            inner.event(
                "disconnected",
                serde_json::json!({ "peer": self.peer_node, "out_of_sync_bytes": oos }),
            );
        }
        self.accept.notify_one();
        self.run(effects);
    }

    /// Runs `f` under the lock if connection `session` is still the current one
    /// (`None` otherwise), then performs its effects.
    fn with_session<T>(
        &self,
        session: u64,
        f: impl FnOnce(&Self, &mut Inner, &mut Vec<Effect>) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        let mut effects = io::fx_vec();
        let out = {
            let mut g = self.lock();
            let inner = &mut *g;
            if inner.link.as_ref().is_none_or(|l| l.session() != session) {
                return Ok(None);
            }
            f(self, inner, &mut effects)
        };
        self.run(effects);
        out.map(Some)
    }

    /// An ack from the meta socket ([`crate::replica::Event::PeerAck`]; a read the peer
    /// could not serve fails here).
    pub fn peer_ack(&self, session: u64, cmd: Command, ack: wire::BlockAck) -> Result<(), String> {
        self.with_session(session, |v, inner, fx| {
            if cmd == Command::P_NEG_DREPLY && inner.node.role == Role::Primary {
                v.remote_read_failed(inner, ack.block_id);
                return Ok(());
            }
            let block_id = ack.block_id;
            Self::step(inner, Event::PeerAck { cmd, block_id })?;
            v.drain(inner, fx);
            Ok(())
        })
        .map(|_| ())
    }

    /// `P_BARRIER_ACK`.
    pub fn barrier_ack(&self, session: u64, nr: u32, set_size: u32) -> Result<(), String> {
        self.with_session(session, |v, inner, fx| {
            Self::step(inner, Event::BarrierAck { nr, set_size })?;
            v.drain(inner, fx);
            Ok(())
        })
        .map(|_| ())
    }

    /// `P_BARRIER` from the peer; waits while the receiver is full, like a write.
    pub async fn peer_barrier(&self, session: u64, nr: u32) -> Result<(), String> {
        loop {
            let notified = self.accept.notified();
            let outcome = self.with_session(session, |v, inner, fx| {
                if Self::step(inner, Event::PeerBarrier(nr))? == Outcome::Full {
                    return Ok(false);
                }
                v.drain(inner, fx);
                Ok(true)
            })?;
            match outcome {
                None | Some(true) => return Ok(()),
                Some(false) => notified.await,
            }
        }
    }

    /// `P_OUT_OF_SYNC` on a live connection ([`Event::PeerOutOfSync`]): marked; its
    /// connection state is logged as DRBD does (rate-limited: an Ahead peer sends one
    /// per write).
    pub fn peer_out_of_sync(&self, session: u64, sector: u64, len: u32) -> Result<(), String> {
        self.with_session(session, |v, inner, fx| {
            Self::step(inner, Event::PeerOutOfSync { sector, len })?;
            crate::warn_limited!(
                "P_OUT_OF_SYNC at sector {sector} (+{len} bytes) while {}: marked out of \
                 sync (DRBD expects it only while Behind)",
                inner.node.conn
            );
            v.drain(inner, fx);
            Ok(())
        })
        .map(|_| ())
    }

    /// `P_STATE` from the peer ([`Event::PeerState`]).
    pub fn peer_state(&self, session: u64, word: u32) -> Result<(), String> {
        let random = random_uuid(&mut rand::thread_rng());
        self.with_session(session, |v, inner, fx| {
            Self::step(inner, Event::PeerState { word, random })?;
            v.drain(inner, fx);
            Ok(())
        })
        .map(|_| ())
    }

    /// The peer's disk failed (or was detached) while connected
    /// ([`Action::PeerDiskFailed`]): reported in the log, the events and status.
    fn peer_disk_failed(&self, inner: &mut Inner, disk: DiskState) {
        tracing::error!(
            "peer {}'s disk is {disk}: its copy is out of date from here on",
            self.peer_node
        );
        inner.event(
            "peer-disk-failed",
            serde_json::json!({ "peer": self.peer_node, "disk": disk }),
        );
        inner.peer_disk_failure = Some(format!(
            "{}'s disk reported {disk} at {}: its copy lacks every write since",
            self.peer_node,
            unix_time_string()
        ));
    }

    /// [`Action::DetachedStandAlone`]: once the `P_NEG_ACK` and the `P_STATE` have
    /// left, a Secondary whose disk is detached stays StandAlone (called without the
    /// lock).
    fn detached_standalone(&self) {
        self.after_queued_packets_leave(|me| async move {
            if me.lock().node.role != Role::Primary {
                tracing::error!(
                    "the disk is detached: staying StandAlone; fix the disk and restart \
                     the node to attach it again (a resync from the peer repairs it)"
                );
                me.set_standalone(true);
            }
        });
    }

    /// The first failed write took the disk out of service (`f`): logged, an event, the
    /// reason for status; a detached disk takes no more IO.
    fn disk_left_service(&self, inner: &mut Inner, w: &LocalWrite, f: DiskFailure) {
        let why = format!(
            "a write of {} bytes at sector {} failed at {} (on-io-error {})",
            w.len,
            w.sector,
            unix_time_string(),
            self.on_io_error.name()
        );
        tracing::error!("local disk: {why}, now {}", f.disk);
        inner.event("disk-failed", serde_json::json!({ "why": why }));
        inner.disk_failure = Some(why);
        if f.disk <= DiskState::Failed {
            self.detached
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if f.disk == DiskState::Diskless {
            tracing::error!(
                "the disk is detached: this Primary is Diskless and serves through peer {} \
                 (writes fail while it is not connected)",
                self.peer_node
            );
            inner.event("diskless", serde_json::json!({ "peer": self.peer_node }));
        }
    }

    /// True when a failed write took the disk out of service on a Secondary (`Failed`);
    /// a detached Primary is `Diskless` instead and still connects: it serves through
    /// its peer.
    pub fn disk_failed(&self) -> bool {
        self.lock().node.disk == DiskState::Failed
    }

    /// A peer's `P_STATE_CHG_REQ` / `P_CONN_ST_CHG_REQ` ([`Event::StateRequest`]):
    /// decided by the node, answered on the meta socket, then applied.
    pub fn peer_state_request(&self, session: u64, cmd: Command, req: wire::ReqState) {
        let random = random_uuid(&mut rand::thread_rng());
        let _ = self.with_session(session, |v, inner, fx| {
            let ev = Event::StateRequest {
                cmd,
                req,
                resolve_conflicts: inner.resolve_conflicts,
                random,
            };
            if let Outcome::Answered(rv) = Self::step(inner, ev)? {
                if !rv.is_success() {
                    tracing::warn!(
                        "refused the peer's state change request (mask {:#x}, val {:#x}): {}",
                        req.mask,
                        req.val,
                        rv.describe()
                    );
                }
            }
            v.drain(inner, fx);
            Ok(())
        });
    }

    /// The peer asked for a full resync (its `invalidate` or `invalidate-remote`): tandem
    /// starts a resync only at a handshake, so once the reply has left, a target marks
    /// every block out of sync (as `invalidate` does) and the connection is renewed; the
    /// handshake then decides the resync from the disk states and bitmaps.
    /// ([`Action::RenewForResync`]; called without the lock.)
    fn renew_for_resync(&self, session: u64, target: bool) {
        self.after_queued_packets_leave(move |me| async move {
            let kill = {
                let g = me.lock();
                match &g.link {
                    Some(l) if l.session() == session => g.kill.clone(),
                    _ => return,
                }
            };
            tracing::warn!(
                "a resync {} this node is due; renewing the connection",
                if target { "into" } else { "with" }
            );
            if target {
                if let Err(e) = me.invalidate().await {
                    tracing::error!("cannot invalidate for the peer's resync: {e}");
                }
            } else if let Some(k) = kill {
                k.notify_one();
            }
        });
    }

    /// Runs `f` once the packets queued so far (a state change reply, a `P_NEG_ACK`, a
    /// `P_STATE`) are in their sockets (`Link::sent`), at most [`QUEUED_PACKETS_LEAVE`]
    /// later: ending the connection at once aborts its sender tasks, which may not have
    /// written them yet (the connection's end then lets the peer read them:
    /// `net::session::linger`). Called without the volume's lock.
    fn after_queued_packets_leave<F, Fut>(&self, f: F)
    where
        F: FnOnce(Arc<Volume>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Some(me) = self.me.upgrade() else { return };
        let sent = self.lock().link.as_ref().map(Link::sent);
        tokio::spawn(async move {
            if let Some(sent) = sent {
                let _ = tokio::time::timeout(QUEUED_PACKETS_LEAVE, sent).await;
            }
            f(me).await;
        });
    }

    /// The peer's `P_STATE_CHG_REPLY` / `P_CONN_ST_CHG_REPLY` to this node's request
    /// ([`Event::StateReply`]).
    pub fn state_reply(&self, session: u64, retcode: i32) {
        let _ = self.with_session(session, |v, inner, fx| {
            Self::step(inner, Event::StateReply { code: retcode })?;
            v.drain(inner, fx);
            Ok(())
        });
    }

    /// A write from the peer; waits while the receiver is full (back-pressure).
    pub async fn peer_write(&self, session: u64, w: PeerWrite) -> Result<(), String> {
        let (kind, mut buf) = match w.kind {
            PeerWriteKind::Data(b) => (WriteKind::Data, Some(b)),
            PeerWriteKind::Discard => (WriteKind::Discard, None),
            PeerWriteKind::Zeroes { unmap } => (WriteKind::Zeroes { unmap }, None),
        };
        let ev = Event::PeerWrite(request::PeerWrite {
            block_id: w.block_id,
            sector: w.sector,
            len: w.len,
            kind,
            dp_flags: w.dp_flags,
        });
        loop {
            let notified = self.accept.notified();
            let outcome = self.with_session(session, |v, inner, fx| {
                let Outcome::Taken(token) = Self::step(inner, ev)? else {
                    return Ok(false);
                };
                if let Some(b) = buf.take() {
                    inner.peer_bufs.insert(token, b);
                }
                v.drain(inner, fx);
                Ok(true)
            })?;
            match outcome {
                None | Some(true) => return Ok(()),
                Some(false) => notified.await,
            }
        }
    }

    // ----- turning core outputs into IO -----------------------------------------------

    /// Feeds `ev` to the node ([`Node::step`]); its actions wait in `inner.actions` for
    /// [`Self::drain`]. The peer's error is returned (the caller drops the connection);
    /// a broken contract is a bug on this node and panics.
    fn step(inner: &mut Inner, ev: Event) -> Result<Outcome, String> {
        match inner.node.step(ev, &mut inner.actions) {
            Ok(outcome) => Ok(outcome),
            Err(StepError::Peer(why)) => Err(why),
            // (A request's error comes only from `Event::Request`: `core_request`.)
            Err(e @ (StepError::Contract(_) | StepError::Request(_))) => panic!("{e}"),
        }
    }

    /// Feeds an event no peer sent (a local completion, the connection's loss) to the
    /// node ([`Self::step`]): an error of the peer's kind is logged, not answered.
    fn feed_local(inner: &mut Inner, ev: Event) {
        if let Err(why) = Self::step(inner, ev) {
            tracing::error!("replication core refused a local event: {why}");
        }
    }

    /// Queues `pkt` (and `data` after it) on the live connection's `stream`; returns
    /// whether it was queued.
    fn send(inner: &Inner, stream: Stream, pkt: &Packet, data: Option<Arc<AlignedBuf>>) -> bool {
        let Some(l) = &inner.link else { return false };
        Self::queued(inner, l.send(stream, pkt, data))
    }

    /// Whether a send was queued. A full queue means a bound was miscomputed: the
    /// connection is dropped (its writes become out of sync) rather than the queue grown.
    fn queued(inner: &Inner, sent: Result<(), SendError>) -> bool {
        match sent {
            Ok(()) => true,
            Err(SendError::Closed) => false,
            Err(e @ SendError::Encode(_)) => {
                tracing::error!("{e}");
                false
            }
            Err(SendError::Full) => {
                tracing::error!(
                    "send queue full (a bound was miscomputed); dropping the connection"
                );
                if let Some(k) = &inner.kill {
                    k.notify_one();
                }
                false
            }
        }
    }

    fn send_state(&self, inner: &mut Inner) {
        if let Some(pkt) = inner.node.state_packet() {
            Self::send(inner, Stream::Data, &pkt, None);
        }
    }

    /// Performs the node's actions (`replica::Node::drain`): sends are queued on the
    /// connection now, under the lock, in the order the cores emitted them; IO and
    /// completions become effects, started after the lock is released.
    fn drain(&self, inner: &mut Inner, fx: &mut Vec<Effect>) {
        let mut actions = std::mem::take(&mut inner.actions);
        inner.node.drain(&mut actions);
        for a in actions.drain(..) {
            match a {
                Action::LocalWrite(w) => fx.push(Self::local_write(inner, w)),
                Action::PrimaryFlush { tag } => fx.push(Effect::PrimaryFlush { tag }),
                Action::FlushRound => fx.push(Effect::FlushRound),
                Action::MetaWrite {
                    tag,
                    offset,
                    data,
                    preflush,
                } => Self::core_meta_write(inner, fx, tag, offset, data, preflush),
                Action::SendWrite {
                    block_id,
                    id,
                    sector,
                    len,
                    kind,
                    dp_flags,
                } => {
                    let head = wire::DataHeader {
                        sector,
                        block_id,
                        seq_num: 0,
                        dp_flags,
                    };
                    self.send_write(inner, head, (id, len, kind));
                }
                Action::Send { stream, pkt } => {
                    Self::send(inner, stream, &pkt, None);
                }
                Action::Complete { id, ok } => Self::complete_request(inner, id, ok, fx),
                Action::Retired { tag } => {
                    inner.peer_waits.retired(tag);
                    self.core_room.notify_waiters();
                }
                Action::SendSync { stream, pkt, reply } => {
                    Self::send_sync(inner, stream, &pkt, reply);
                }
                Action::SyncRead(r) => fx.push(Effect::SyncRead(r)),
                Action::SyncZeroes {
                    run,
                    tag,
                    sector,
                    len,
                } => fx.push(Effect::SyncWrite {
                    run,
                    tag,
                    sector,
                    len,
                    data: None,
                }),
                Action::BitmapWriteBack => fx.push(Effect::SyncBitmap),
                a => self.control_action(inner, a, fx),
            }
        }
        inner.actions = actions;
    }

    /// The node's actions that are not IO or packets of the write path: the
    /// connection's and the runs' ends, role and disk reports, plans and answers.
    fn control_action(&self, inner: &mut Inner, a: Action, fx: &mut Vec<Effect>) {
        match a {
            Action::DropConnection { reason } => {
                tracing::warn!("dropping the connection: {reason}");
                if let Some(k) = &inner.kill {
                    k.notify_one();
                }
            }
            Action::PeerDiskFailed { disk } => self.peer_disk_failed(inner, disk),
            Action::SourceEnded(end) => self.source_ended(inner, end),
            Action::VerifyInterrupted(p) => Self::verify_interrupted(inner, p),
            Action::RenewForResync { target } => {
                if let Some(l) = &inner.link {
                    let session = l.session();
                    fx.push(Effect::RenewForResync { session, target });
                }
            }
            Action::TargetFinished {
                run,
                summary,
                adopt,
            } => self.target_finished(inner, run, summary, adopt, fx),
            Action::VerifyFinished {
                progress,
                crash_repaired,
            } => self.verify_finished(inner, progress, crash_repaired),
            Action::CrashRepaired => self.crash_repaired(),
            Action::Reply { reply, refused } => {
                if let Some(tx) = inner.admin_replies.remove(&reply) {
                    let _ = tx.send(Err(refused.to_string()));
                }
            }
            Action::RoleChanged(role) => Self::role_logged(inner, role),
            Action::DiskLeftService { w, failure } => self.disk_left_service(inner, &w, failure),
            Action::DetachedStandAlone => fx.push(Effect::DetachedStandAlone),
            Action::Persist { plan, then, reply } => {
                let staged = self.stage_plan(inner, plan);
                fx.push(Effect::Persist {
                    staged,
                    then,
                    reply,
                });
            }
            a => panic!("BUG: the drain has no rule for {a:?}"),
        }
    }

    /// [`Action::Complete`]: request `id` is done (`ok`); its reply is an effect.
    fn complete_request(inner: &mut Inner, id: u64, ok: bool, fx: &mut Vec<Effect>) {
        let Some(p) = inner.pending.remove(&id) else {
            panic!("BUG: the core completed request {id}, unknown or completed twice");
        };
        inner.writes_completed += 1;
        if let Some(done) = p.done {
            let result = if ok { Ok(()) } else { Err(BlockError::Io) };
            fx.push(Effect::Complete { done, result });
        }
    }

    /// [`Action::SendWrite`]: this node's write `head` to the peer, with request `id`'s
    /// data (none for a discard or zeroes), counted as sent.
    fn send_write(
        &self,
        inner: &mut Inner,
        head: wire::DataHeader,
        (id, len, kind): (u64, u32, WriteKind),
    ) {
        let Some(link) = inner.link.as_ref() else {
            return;
        };
        let data = match kind {
            WriteKind::Data => inner.pending.get(&id).and_then(|p| p.buf.clone()),
            WriteKind::Discard | WriteKind::Zeroes { .. } => None,
        };
        let zeroes = matches!(kind, WriteKind::Zeroes { .. });
        let block_id = head.block_id;
        let sent_id = (self.protocol == Protocol::A).then_some(block_id);
        let sent = link.send_write(head, len, data, zeroes, sent_id);
        if Self::queued(inner, sent) {
            inner.bytes_replicated += u64::from(len);
            inner.peer_waits.sent(block_id, Instant::now());
        }
    }

    /// A core's write to the local disk with its data: the request's buffer (shared with
    /// the send to the peer), or the peer's.
    fn local_write(inner: &mut Inner, w: LocalWrite) -> Effect {
        let buf = match w.side {
            Side::Primary { id, .. } => inner
                .pending
                .get(&id)
                .and_then(|p| p.buf.clone())
                .map(Buf::Shared),
            Side::Peer { token } => inner.peer_bufs.remove(&token).map(Buf::Owned),
        };
        Effect::LocalWrite { w, buf }
    }

    /// Starts the effects' IO: local writes, flushes, metadata writes and resync reads
    /// and writes through the store's completion sink (`io.rs`), the rest as tasks on
    /// the volume's runtime (`rt`, not the caller's: a frontend request from a thread
    /// outside any runtime passes here too). Called without the volume lock.
    fn run(&self, mut effects: Vec<Effect>) {
        for e in effects.drain(..) {
            match e {
                Effect::Complete { done, result } => match done {
                    Done::Slot(id) => self.replies.complete(id, result),
                    Done::Oneshot(tx) => {
                        let _ = tx.send(result);
                    }
                },
                Effect::LocalWrite { w, buf } => self.start_local_write(w, buf),
                Effect::PrimaryFlush { tag } => self.start_flush(io::IoCtx::PrimaryFlush { tag }),
                Effect::MetaWrite(io::MetaJob {
                    tag,
                    offset,
                    data,
                    preflush,
                }) => {
                    if preflush {
                        self.start_flush(io::IoCtx::MetaPreflush { tag, offset, data });
                    } else {
                        self.start_meta_write(tag, offset, &data);
                    }
                }
                Effect::FlushRound => self.start_flush(io::IoCtx::ReceiverFlush),
                Effect::SyncRead(r) => self.start_sync_read(r),
                Effect::SyncWrite {
                    run,
                    tag,
                    sector,
                    len,
                    data,
                } => self.start_sync_write((run, tag), sector, len, data),
                // Rare (every 5 s of a resync, once at its end): tasks on the runtime.
                Effect::SyncBitmap => self.spawn_task(|v| async move {
                    if let Err(e) = v.persist(Node::write_back_plan()).await {
                        // The on-disk bits stay set: a restart resyncs more, never less.
                        tracing::warn!("lazy bitmap write-out during resync: {e}");
                    }
                }),
                Effect::SyncFinish(end) => {
                    self.spawn_task(move |v| async move { v.finish_target(end).await });
                }
                Effect::RenewForResync { session, target } => {
                    self.renew_for_resync(session, target);
                }
                Effect::DetachedStandAlone => self.detached_standalone(),
                Effect::Persist {
                    staged,
                    then,
                    reply,
                } => self.finish_persist(staged, then, reply),
            }
        }
        io::recycle(effects);
    }

    /// Runs `f` on the volume as a task of its runtime (not after the volume is gone).
    fn spawn_task<F, Fut>(&self, f: F)
    where
        F: FnOnce(Arc<Volume>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Some(v) = self.me.upgrade() {
            self.rt.spawn(f(v));
        }
    }

    /// Feeds a local IO result to a core under the lock, then runs what it asks for. A
    /// completion may free room in the receiver, so the data socket's reader is woken.
    fn feed(&self, f: impl FnOnce(&Self, &mut Inner, &mut Vec<Effect>)) {
        let mut fx = io::fx_vec();
        {
            let mut g = self.lock();
            f(self, &mut g, &mut fx);
        }
        self.accept.notify_one();
        self.run(fx);
    }

    async fn flush_local(&self) -> bool {
        match self.store.flush().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("local flush failed: {e}");
                false
            }
        }
    }

    // ----- frontend requests -----------------------------------------------------------

    /// One write/flush request through the core; waits for its completion.
    async fn core_request(
        &self,
        sector: u64,
        len: u32,
        kind: Option<(WriteKind, bool)>,
        buf: Option<Arc<AlignedBuf>>,
    ) -> Result<(), BlockError> {
        let _permit = self
            .slots
            .acquire()
            .await
            .map_err(|_| BlockError::Shutdown)?;
        let mut fx = io::fx_vec();
        let secondary_flush = {
            let mut g = self.lock();
            let inner = &mut *g;
            if inner.shutting_down {
                return Err(BlockError::Shutdown);
            }
            if inner.node.role != Role::Primary {
                if kind.is_some() {
                    return Err(BlockError::ReadOnly);
                }
                true
            } else {
                false
            }
        };
        if secondary_flush {
            return if self.flush_local().await {
                Ok(())
            } else {
                Err(BlockError::Io)
            };
        }
        let io = match kind {
            Some((kind, fua)) => Io::Write {
                sector,
                len,
                kind,
                fua,
            },
            None => Io::Flush,
        };
        let mut buf = buf;
        let (waiter, alone) = loop {
            // Completed writes stay in the core until their epoch is barrier-acked
            // (≤ 2 × max-buffers); under protocol A the application can outrun the acks.
            // Then the request waits for room (a retirement, or the connection's end,
            // which retires everything) instead of failing. The common case takes the
            // lock once.
            let room = self.core_room.notified();
            let gate_closed;
            {
                let mut g = self.lock();
                let inner = &mut *g;
                // A staged generation or role flag reaches the disk before any write
                // made in it (`durable.rs`); checked under the lock that stages them.
                let gate = self.meta.write_gate();
                let detached = self.detached.load(std::sync::atomic::Ordering::Relaxed);
                if gate == Gate::Failed && !detached {
                    return Err(BlockError::Io);
                }
                gate_closed = gate == Gate::Wait;
                if !gate_closed {
                    if let Some(taken) = self.admit(inner, io, &mut buf, &mut fx)? {
                        break taken;
                    }
                }
            }
            if gate_closed {
                // Err: the next look finds the gate Failed.
                let _ = self.meta.settled().await;
            } else {
                room.await;
            }
        };
        self.start_and_wait(fx, waiter, alone).await
    }

    /// Feeds a request to the node ([`Event::Request`]) under the lock, with its buffer
    /// (`buf`, kept under the request's id) and a reply slot: `Some` (its waiter, and
    /// whether it is the only request in flight on a connection) once taken, `None` while
    /// the core has no room (the buffer stays with the caller, which waits for room).
    fn admit(
        &self,
        inner: &mut Inner,
        io: Io,
        buf: &mut Option<Arc<AlignedBuf>>,
        fx: &mut Vec<Effect>,
    ) -> Result<Option<(Waiter, bool)>, BlockError> {
        let id = inner.next_id;
        let (done, w) = self.reply_slot();
        let pending = Pending {
            buf: buf.take(),
            done: Some(done),
        };
        inner.pending.insert(id, pending);
        let outcome = inner
            .node
            .step(Event::Request { id, io }, &mut inner.actions);
        if outcome == Ok(Outcome::Done) {
            inner.next_id += 1;
            self.drain(inner, fx);
            return Ok(Some((w, inner.pending.len() == 1 && inner.link.is_some())));
        }
        // Not taken: the request keeps its buffer, the reply slot goes back.
        if let Some(p) = inner.pending.remove(&id) {
            *buf = p.buf;
            if let Some(Done::Slot(slot)) = p.done {
                self.replies.release(slot);
            }
        }
        match outcome {
            Ok(Outcome::Full) if !inner.shutting_down => Ok(None),
            Ok(Outcome::ReadOnly) => Err(BlockError::ReadOnly),
            Ok(_) => Err(BlockError::Busy),
            Err(StepError::Request(_)) => Err(BlockError::Invalid),
            Err(e) => panic!("{e}"),
        }
    }

    /// Where a new request's result will go: a reply slot, or a `oneshot` if none is free.
    fn reply_slot(&self) -> (Done, Waiter) {
        match self.replies.take() {
            Some(slot) => (Done::Slot(slot), Waiter::Slot(slot)),
            None => {
                let (tx, rx) = oneshot::channel();
                (Done::Oneshot(tx), Waiter::Oneshot(rx))
            }
        }
    }

    /// Runs a request's core step's effects, then waits for its result.
    async fn start_and_wait(
        &self,
        fx: Vec<Effect>,
        waiter: Waiter,
        alone: bool,
    ) -> Result<(), BlockError> {
        if alone && fx.iter().any(|e| matches!(e, Effect::LocalWrite { .. })) {
            // The step queued the P_DATA; let the sender task put it on the socket before
            // the local write's io_uring_enter (~20 µs in a VM), as when the local write
            // was a task of its own: the peer's round trip overlaps the local IO. Only
            // for a request alone in the core (QD1): with more, the sender is busy anyway
            // and a yield would push the NBD reader's queued requests into tasks.
            tokio::task::yield_now().await;
        }
        self.run(fx);
        match waiter {
            Waiter::Slot(slot) => self.replies.wait(slot).await,
            Waiter::Oneshot(rx) => rx.await.map_err(|_| BlockError::Io)?,
        }
    }

    async fn write(&self, offset: u64, data: Arc<AlignedBuf>, fua: bool) -> Result<(), BlockError> {
        let len = data.len();
        if len <= MAX_WRITE_CHUNK {
            let len32 = u32::try_from(len).map_err(|_| BlockError::Invalid)?;
            return self
                .core_request(
                    offset / SECTOR_SIZE as u64,
                    len32,
                    Some((WriteKind::Data, fua)),
                    Some(data),
                )
                .await;
        }
        // Larger than one bio: 1 MiB pieces (one copy each), submitted together.
        let mut parts = Vec::new();
        for (i, chunk) in data.chunks(MAX_WRITE_CHUNK).enumerate() {
            let piece = Arc::new(AlignedBuf::from_slice(chunk).map_err(|_| BlockError::Invalid)?);
            let off = offset + (i * MAX_WRITE_CHUNK) as u64;
            let len32 = u32::try_from(chunk.len()).map_err(|_| BlockError::Invalid)?;
            parts.push(self.core_request(
                off / SECTOR_SIZE as u64,
                len32,
                Some((WriteKind::Data, fua)),
                Some(piece),
            ));
        }
        join_all(parts).await
    }

    /// A discard or write-zeroes: one core request. At most [`MAX_BATCH_CHUNK`] (128 MiB,
    /// DRBD's batch limit) arrives here; a longer one is refused and the frontend splits
    /// it (`TargetInfo::max_discard_bytes`).
    async fn range_request(
        &self,
        offset: u64,
        len: u64,
        kind: WriteKind,
        fua: bool,
    ) -> Result<(), BlockError> {
        let len = u32::try_from(len).map_err(|_| BlockError::Invalid)?;
        self.core_request(offset / SECTOR_SIZE as u64, len, Some((kind, fua)), None)
            .await
    }

    /// Stops accepting requests, waits (≤ `grace`) for in-flight ones, then the clean
    /// stop's plan (`replica::Node::clean_stop_plan`: the data flushed, every dirty bitmap
    /// page, a clean superblock); with writes still in flight or a failed metadata write,
    /// only the data is flushed and the metadata stays unclean (the next attach applies
    /// the activity log, which is what a crash would get). A failed step leaves it
    /// unclean too.
    pub async fn shutdown(&self, grace: Duration) {
        let slots = {
            let mut g = self.lock();
            g.shutting_down = true;
            u32::try_from(g.node.primary.config().max_in_flight).unwrap_or(u32::MAX)
        };
        // Every request holds a slot: holding them all means none is in flight.
        if tokio::time::timeout(grace, self.slots.acquire_many(slots))
            .await
            .is_err()
        {
            tracing::warn!("requests still in flight at shutdown");
        }
        // The peer writes received before the connection went are applied first
        // (`request::Receiver`), so that the clean stop records them.
        self.wait_sync_io_idle().await;
        let plan = self.lock().node.clean_stop_plan();
        match plan {
            Ok(plan) => match self.persist(plan).await {
                Ok(()) => tracing::info!("metadata clean"),
                Err(e) => tracing::error!("{e}: metadata left unclean"),
            },
            Err(why) => {
                tracing::warn!(
                    "{why}: metadata left unclean (the next start applies the activity log)"
                );
                if !self.flush_clears().await {
                    tracing::error!("final flush failed");
                }
            }
        }
        // close() waits for the ring thread (bounded by the store's CLOSE_TIMEOUT).
        let store = self.store.clone();
        let meta = self.meta_store.clone();
        let _ = tokio::task::spawn_blocking(move || {
            store.close();
            meta.close();
        })
        .await;
    }

    /// Records why the last connection attempt failed (`None`: a handshake succeeded);
    /// shown as `connection_error` and `connection_error_at` (Unix seconds) in status.
    fn set_connection_error(&self, why: Option<String>) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        *self
            .conn_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why.map(|w| (w, at));
    }

    /// The status object of the management API.
    pub fn status(&self) -> serde_json::Value {
        let conn_error = self
            .conn_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let g = self.lock();
        let oos = g.node.primary.out_of_sync_bytes();
        let peer = if g.link.is_some() {
            // A peer that missed writes (blocks out of sync here) is not UpToDate, whatever
            // it believes; until resync it is Outdated.
            // A Diskless Primary's bits are blocks its own (failed) disk lacks.
            let disk = if oos > 0 && g.node.role == Role::Primary && !g.node.primary.is_detached() {
                DiskState::Outdated
            } else {
                g.node.peer_disk
            };
            serde_json::json!({ "node": self.peer_node, "role": g.node.peer_role, "disk": disk })
        } else {
            serde_json::Value::Null
        };
        let pstats = g.node.primary.stats();
        let rstats = g.node.receiver.stats();
        // A failed metadata write takes the disk out of use (DRBD's detach); a detached
        // Primary is Diskless (`g.node.disk`).
        let disk = if pstats.meta_failed && !pstats.detached {
            DiskState::Failed
        } else {
            g.node.disk
        };
        serde_json::json!({
            "resource": self.resource,
            "node": self.node,
            "role": g.node.role,
            "disk": disk,
            "connection": g.node.conn,
            "protocol": self.protocol,
            "peer": peer,
            "size_bytes": self.size_bytes,
            "in_flight_writes": pstats.in_flight_writes,
            "unacked_writes": pstats.unacked_writes,
            "peer_writes_in_flight": rstats.active_writes,
            "peer_writes_held": rstats.held,
            "bytes_replicated": g.bytes_replicated,
            "writes_completed": g.writes_completed,
            "out_of_sync_bytes": oos,
            "activity_log": pstats.al,
            "al_waiting_writes": pstats.al_waiting,
            "crashed_primary": g.node.crashed_primary,
            "startup_role": g.startup_role,
            "disk_failure": g.disk_failure,
            "peer_disk_failure": g.peer_disk_failure,
            "on_io_error": self.on_io_error.name(),
            "uuids": g.node.uuids.to_string(),
            "connection_error": conn_error.as_ref().map(|e| &e.0),
            "connection_error_at": conn_error.as_ref().map(|e| e.1),
            "split_brain": g.split_brain,
            "split_brain_resolved": g.split_brain_resolved,
            "resync": self.sync_status(&g),
            "verify": Self::verify_status(&g),
            "last_verify": g.last_verify,
            "last_resync": g.last_sync,
            "resync_bytes_sent": g.resync_bytes_sent,
            "resync_hole_reads_skipped": g.hole_reads_skipped,
            "net_tx_bytes": self.net_tx_bytes.load(std::sync::atomic::Ordering::Relaxed),
            "app_io_sectors": g.app_io_sectors,
            "open_writers": self.openers.count(),
            "opened_by": self.openers.describe(),
        })
    }
}

/// A core refusing a local completion is a driver bug (unknown or duplicate tag): logged,
/// never fatal, since the core's state is unchanged when it refuses.
/// Seconds since the epoch, for messages an operator reads beside logs.
fn unix_time_string() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("unix time {s}")
}

/// Checks a core's answer to a completion this driver fed it. `Invalid` is a broken
/// contract between driver and core (an unknown handle, a completion that arrives twice,
/// an output out of order): a bug on this node, never an input error, so the assertion
/// stays on in release and the daemon stops (see `daemon::crash_on_panic`) rather than
/// go on with a state that no longer describes the disk. Other refusals are operating
/// conditions and are logged.
#[track_caller]
fn contract(r: Result<(), CoreError>) {
    match r {
        Ok(()) => {}
        Err(e @ CoreError::Invalid(_)) => panic!("BUG: driver/core contract broken: {e}"),
        Err(e) => tracing::error!("replication core refused a local completion: {e}"),
    }
}

enum Buf {
    Shared(Arc<AlignedBuf>),
    Owned(PeerData),
}

async fn join_all<F: std::future::Future<Output = Result<(), BlockError>>>(
    parts: Vec<F>,
) -> Result<(), BlockError> {
    // All parts run concurrently; the first error (if any) is the request's.
    futures_util::future::join_all(parts)
        .await
        .into_iter()
        .collect()
}

impl BlockTarget for Volume {
    /// Block sizes from the backing device (the store's `BLKSSZGET` / O_DIRECT probe and
    /// `BLKPBSZGET`, 4096 for files); READ/WRITE up to 32 MiB (a write over
    /// [`MAX_WRITE_CHUNK`] is split into 1 MiB replicated writes, one copy each);
    /// discard and write-zeroes up to [`MAX_BATCH_CHUNK`] (128 MiB, DRBD's batch limit)
    /// per request; a volatile cache (a flush is a barrier on both replicas) and FUA.
    fn info(&self) -> TargetInfo {
        let g = self.lock();
        let lbs = self.store.logical_block_size();
        let pbs = self.store.physical_block_size().max(lbs);
        TargetInfo {
            size_bytes: self.size_bytes,
            writable: g.node.role == Role::Primary,
            logical_block_size: lbs,
            physical_block_size: pbs,
            max_io_bytes: crate::frontend::MAX_IO_BYTES,
            discard_granularity: pbs,
            max_discard_bytes: MAX_BATCH_CHUNK,
            max_write_zeroes_bytes: MAX_BATCH_CHUNK,
            volatile_cache: true,
            fua: true,
        }
    }

    fn openers(&self) -> Option<Arc<Openers>> {
        Some(Arc::clone(&self.openers))
    }

    /// Runs on the caller's thread up to the first wait; needs no runtime there (see
    /// `frontend`): locks, tokio's runtime-free semaphores, `oneshot`s and `Notify`, a
    /// store submit, and effects spawned on the volume's own runtime. `req.queue` is not
    /// used yet.
    async fn submit(&self, req: crate::frontend::BlockRequest) -> Result<BlockReply, BlockError> {
        let lbs = u64::from(self.store.logical_block_size());
        let aligned = |offset: u64, len: u64| {
            offset.is_multiple_of(lbs)
                && len.is_multiple_of(lbs)
                && offset
                    .checked_add(len)
                    .is_some_and(|end| end <= self.size_bytes)
        };
        match req.io {
            BlockIo::Read { offset, buf } => {
                let len = u32::try_from(buf.len()).map_err(|_| BlockError::Invalid)?;
                if !aligned(offset, u64::from(len)) {
                    return Err(BlockError::Invalid);
                }
                {
                    let mut g = self.lock();
                    if g.shutting_down {
                        return Err(BlockError::Shutdown);
                    }
                    g.app_io_sectors += u64::from(len) / SECTOR_SIZE as u64;
                }
                if self.read_from_peer(offset, len) {
                    return self.remote_read(offset, buf).await.map(BlockReply::Data);
                }
                let buf = self.store.read_into(offset, buf).await.map_err(|e| {
                    tracing::warn!("read of {len} bytes at {offset} failed: {e}");
                    BlockError::Io
                })?;
                Ok(BlockReply::Data(buf))
            }
            BlockIo::Write { offset, data, fua } => {
                if !aligned(offset, data.len() as u64) {
                    return Err(BlockError::Invalid);
                }
                self.write(offset, data, fua)
                    .await
                    .map(|()| BlockReply::Done)
            }
            BlockIo::Flush => self
                .core_request(0, 0, None, None)
                .await
                .map(|()| BlockReply::Done),
            BlockIo::Discard { offset, len, fua } => {
                if len > MAX_BATCH_CHUNK || !aligned(offset, len) {
                    return Err(BlockError::Invalid);
                }
                self.range_request(offset, len, WriteKind::Discard, fua)
                    .await
                    .map(|()| BlockReply::Done)
            }
            BlockIo::WriteZeroes {
                offset,
                len,
                may_unmap,
                fua,
            } => {
                if len > MAX_BATCH_CHUNK || !aligned(offset, len) {
                    return Err(BlockError::Invalid);
                }
                self.range_request(offset, len, WriteKind::Zeroes { unmap: may_unmap }, fua)
                    .await
                    .map(|()| BlockReply::Done)
            }
        }
    }
}
