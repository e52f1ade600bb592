//! The replica seam: what a connection needs from the replica it serves.
//!
//! `net` owns sockets, the handshake, liveness and reconnects; it knows nothing of the
//! volume. It talks to the replica only through [`Replica`]: lifecycle reports from the
//! connection manager ([`LinkEvent`]), the handshake and bitmap exchange, and the decoded
//! packets of a live connection ([`PeerEvent`], one call per packet). The replica talks
//! back only through the [`super::Link`] it is handed in [`Replica::connection_up`]. So
//! the import graph has `volume → net` and never `net → volume`.
//!
//! Every packet event carries its connection number (`session`); the replica ignores
//! events of a connection that is no longer its live one. A returned `Err` is a protocol
//! violation by the peer (or a local failure that must end the connection): the
//! connection is dropped with that text as its error.

use super::handshake::{Agreed, LocalParams, PeerParams};
use super::Link;
use super::NetError;
use crate::resync::Inbound;
use crate::state::uuid::UuidPacket;
use crate::state::ConnState;
use crate::store::AlignedBuf;
use crate::wire::{self, Command};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{Notify, OwnedSemaphorePermit};

/// Received data of one peer packet, holding its share of the replica's receive budget
/// until dropped (see [`Replica::receive_buffer`]).
#[derive(Debug)]
pub struct PeerData {
    /// The bytes, read straight from the socket.
    pub buf: AlignedBuf,
    _budget: OwnedSemaphorePermit,
}

impl PeerData {
    /// `buf`, charged to the budget `permit` was taken from.
    pub fn new(buf: AlignedBuf, permit: OwnedSemaphorePermit) -> Self {
        PeerData {
            buf,
            _budget: permit,
        }
    }

    /// The buffer and the budget it holds, to keep the budget past the buffer's move.
    pub fn into_parts(self) -> (AlignedBuf, OwnedSemaphorePermit) {
        (self.buf, self._budget)
    }
}

/// How a SyncSource's run begins, handed to [`Replica::connection_up`] once the bitmaps
/// have crossed: the replica queues `P_OUT_OF_SYNC` for every block it marked that
/// `known` lacks (written while the exchange ran), then `P_SYNC_UUID`, ahead of its
/// first replicated write and in the step that starts replicating, so that no write
/// falls between what the target learns and what the Primary sends it.
#[derive(Debug)]
pub struct SourceStart {
    /// The bitmap the peer holds, word for word: the one this node sent OR the peer's.
    pub known: Vec<u64>,
    /// The sync UUID to send (already durable: [`Replica::begin_sync_source`]).
    pub sync_uuid: u64,
}

/// A write received from the peer, with its data.
#[derive(Debug)]
pub struct PeerWrite {
    /// Echoed in the acks.
    pub block_id: u64,
    /// First sector.
    pub sector: u64,
    /// Bytes.
    pub len: u32,
    /// The packet's `dp_flags`.
    pub dp_flags: u32,
    /// What to do.
    pub kind: PeerWriteKind,
}

/// What a peer write does.
#[derive(Debug)]
pub enum PeerWriteKind {
    /// `P_DATA`.
    Data(PeerData),
    /// `P_TRIM` with discard semantics.
    Discard,
    /// `P_ZEROES` (or `P_TRIM` without `DRBD_FF_WZEROES`).
    Zeroes {
        /// May deallocate.
        unmap: bool,
    },
}

/// One decoded packet of a live connection, in the order its socket delivered it.
#[derive(Debug)]
pub enum PeerEvent {
    /// `P_DATA`, `P_TRIM`, `P_ZEROES`: the peer (Primary) replicates a write.
    Write(PeerWrite),
    /// `P_RS_DATA_REPLY`: resync data for this node (SyncTarget).
    ResyncData {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// The data.
        data: PeerData,
    },
    /// `P_DATA_REPLY`: the answer to a read this node asked the peer for.
    ReadReply {
        /// This node's request id.
        block_id: u64,
        /// The data.
        data: PeerData,
    },
    /// `P_DATA_REQUEST`: the peer reads a block from this node.
    ReadRequest {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// The peer's request id.
        block_id: u64,
    },
    /// A resync or verify request, reply or ack ([`Inbound::from_packet`]).
    Resync(Inbound),
    /// `P_BARRIER`: the peer closed an epoch.
    Barrier(u32),
    /// `P_OUT_OF_SYNC` on a live connection (a kernel peer in DRBD's Ahead mode).
    OutOfSync {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// `P_STATE`: the peer's packed state word.
    State(u32),
    /// `P_STATE_CHG_REQ` / `P_CONN_ST_CHG_REQ`.
    StateRequest {
        /// Which request.
        cmd: Command,
        /// Mask and value.
        req: wire::ReqState,
    },
    /// `P_UUIDS`.
    Uuids(UuidPacket),
    /// `P_WRITE_ACK`, `P_RECV_ACK`, `P_NEG_ACK`, … for an application write.
    Ack {
        /// Which ack.
        cmd: Command,
        /// Its block.
        ack: wire::BlockAck,
    },
    /// `P_BARRIER_ACK`.
    BarrierAck {
        /// The epoch.
        barrier: u32,
        /// Writes in it.
        set_size: u32,
    },
    /// `P_STATE_CHG_REPLY` / `P_CONN_ST_CHG_REPLY`: DRBD's `drbd_state_rv` code.
    StateReply(i32),
}

/// What the connection manager reports about the connection's life.
#[derive(Debug)]
pub enum LinkEvent {
    /// The connection state changed (WFConnection, WFReportParams, StandAlone, …).
    State(ConnState),
    /// The latest connection error (`None`: cleared by a successful handshake).
    Error(Option<String>),
    /// The peer was refused for a permanent reason: go StandAlone until `connect`.
    Refused,
    /// The generation UUIDs say the disks diverged; the node stays StandAlone.
    SplitBrain(String),
    /// The handshake resolved a split brain by the configured policy.
    SplitBrainResolved(String),
    /// Connection `session` is gone (after it was up, or during its handshake).
    Lost(u64),
}

/// The replica a connection serves (the volume in the daemon).
pub trait Replica: Send + Sync + 'static {
    /// A lifecycle report.
    fn link_event(&self, ev: LinkEvent);
    /// The current connection state.
    fn conn_state(&self) -> ConnState;
    /// Whether the node is StandAlone (no listening, no connecting).
    fn is_standalone(&self) -> bool;
    /// Resolves when the node becomes StandAlone.
    fn wait_standalone(&self) -> impl Future<Output = ()> + Send;
    /// Resolves when the node may connect (not StandAlone).
    fn wait_connect_allowed(&self) -> impl Future<Output = ()> + Send;

    /// What this node announces in the handshake.
    fn handshake_params(&self, resolve_conflicts: bool) -> LocalParams;
    /// The handshake's decision: this node sent `sent`, the peer answered `peer`.
    /// [`NetError::SplitBrain`]: refused (a split brain no policy resolves, unrelated
    /// data); [`NetError::Changed`]: this node changed since `sent`, connect again.
    fn agree(&self, sent: &LocalParams, peer: &PeerParams) -> Result<Agreed, NetError>;
    /// Resolves when the resync IO of an older connection has drained.
    fn wait_sync_io_idle(&self) -> impl Future<Output = ()> + Send;
    /// Whether the bitmap may be sent run-length encoded.
    fn use_rle(&self) -> bool;
    /// The out-of-sync bitmap words to send and the bitmap's bit count (`full`: all set).
    fn exchange_snapshot(&self, full: bool) -> (Vec<u64>, u64);
    /// ORs the peer's bitmap in; returns the blocks it added.
    fn merge_peer_bitmap(&self, words: &[u64]) -> u64;
    /// This node is SyncSource: returns the sync UUID, made durable first (sent by
    /// [`Replica::connection_up`], see [`SourceStart`]).
    fn begin_sync_source(&self) -> impl Future<Output = Result<u64, String>> + Send;
    /// This node is SyncTarget of `sync_uuid`: made durable before it returns.
    fn begin_sync_target(&self, sync_uuid: u64) -> impl Future<Output = Result<(), String>> + Send;
    /// The handshake is done; `link` carries every packet from now on (a SyncSource's
    /// first are those of `source`). Returns the notify with which the replica asks for
    /// the connection to be dropped.
    fn connection_up(
        &self,
        link: Link,
        peer: &PeerParams,
        agreed: &Agreed,
        resolve_conflicts: bool,
        source: Option<SourceStart>,
    ) -> Arc<Notify>;

    /// A buffer for `len` received data bytes, waiting for room in the receive budget
    /// (which back-pressures the peer through TCP).
    fn receive_buffer(&self, len: usize) -> impl Future<Output = Result<PeerData, String>> + Send;
    /// One packet of connection `session`.
    fn peer_event(
        &self,
        session: u64,
        ev: PeerEvent,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// `bytes` were written to the sockets.
    fn count_tx(&self, bytes: u64);
    /// Protocol A: the write `block_id` of connection `session` is in the socket.
    fn handed_to_network(&self, session: u64, block_id: u64);
    /// When the oldest write still awaiting the peer was queued (liveness input).
    fn oldest_peer_wait(&self) -> Option<Instant>;
    /// The resync controller's clock, every 100 ms while `session` is up and a resync or
    /// verify run needs it; returns whether one still does.
    fn tick(&self, session: u64) -> bool;
    /// Resolves when a resync or verify run starts (at once if one started since the
    /// last call): the clock sleeps in between instead of ticking for nothing.
    fn wait_sync_run(&self) -> impl Future<Output = ()> + Send;
}
