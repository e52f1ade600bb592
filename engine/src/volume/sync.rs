//! Resync in the volume driver: what happens between the sync handshake and `Connected`,
//! and the SyncTarget / SyncSource machines of [`crate::resync`] run against the real
//! disk and the live connection.
//!
//! The sequence (docs/drbd-reference.md §6.3, §8.2, §9.1), driven by
//! `net::session` on the data socket before the connection's tasks start:
//!
//! 1. [`Volume::exchange_snapshot`]: a full sync sets every bit first; the bitmap's words
//!    are copied for the sender.
//! 2. WFBitMapS sends its bitmap, then receives the peer's; WFBitMapT the other way
//!    round. `merge_peer_bitmap` (`port.rs`) OR-merges what arrived.
//! 3. The SyncSource makes the sync UUID durable ([`Volume::begin_sync_source`]); its
//!    `connection_up` queues `P_OUT_OF_SYNC` for every block its application marked
//!    after the snapshot (`replica::Node::source_start`), then `P_SYNC_UUID`, under the lock
//!    in which the Primary starts replicating — so every write is either told or
//!    replicated. The SyncTarget ORs those blocks into the source's bitmap, then
//!    ([`Volume::begin_sync_target`]) writes its bitmap, clears `MDF_CONSISTENT` and
//!    adopts the sync UUID — all durably, in that order, so a crash from here on
//!    restarts Inconsistent with a bitmap that covers everything the resync has not yet
//!    written.
//! 4. `connection_up` configures the run ([`Volume::run_start`]) and feeds the node
//!    `Event::ConnectionUp`, which starts a target over the merged bitmap or a source,
//!    in [`crate::replica::SyncRuns`] — the runs' rules (run ids, held writes, writes in
//!    flight at the start, the failed-local-write rule, the end of a run, stream classes,
//!    online verify's side) live there, shared with the simulator. The bitmap stays the
//!    Primary core's (the node has one); the runs borrow it per call.
//!
//! This file is the runs' IO driver. Their events are steps of the node
//! ([`crate::replica::Event`]): every 100 ms [`Volume::sync_tick`] (the clock sleeps while
//! no run needs it); resync packets from both sockets through
//! [`Volume::sync_inbound`] / [`Volume::rs_data_reply`] (through
//! `net::Replica::peer_event`); a run's read or write that ended. The volume's drain
//! performs the runs' actions with the cores' ([`Volume::send_sync`] for packets on
//! their stream class; reads and writes as effects like any other local IO, tagged with
//! their run — a completion from an earlier run is dropped by the runs and its bits stay
//! set; the lazy bitmap write-out; the end of a run or a verify). At connection up the
//! volume tells the node how a run the peer starts is configured
//! ([`Volume::peer_started_runs`]). A new connection waits until the runs are
//! idle ([`Volume::wait_sync_io_idle`], ≤ [`SYNC_IO_DRAIN`]), so an old resync write can
//! never land over a newer write of the next connection.
//!
//! Application writes and resync (`docs/design.md` §3): the Primary's local writes are
//! reported to the source (it holds back reads of ranges being written); the peer's
//! writes on a SyncTarget, and a SyncTarget Primary's own until retired, are gated by
//! the runs (`SyncRuns::peer_write_begin`, `primary_write_begin`), and a write the target
//! holds waits in the runs as its effect until released.
//!
//! The end: the target's `Finished` with nothing left flushes the data, writes the bitmap,
//! adopts the source's UUIDs and sets `MDF_CONSISTENT` (disk UpToDate), then says so in
//! `P_STATE`; the source ends its run when the peer's `P_STATE` says Connected/UpToDate.
//! During the run the target's cleared bits reach the disk lazily, every 5 s, after a
//! flush of the data they describe, so a restart resumes near where it stopped instead
//! of from the start.
//!
//! Bounds: the target's requests (8192) and the source's queue (1024 requests, 64 reads
//! of ≤ 1 MiB) as in [`crate::resync`]; reply data is read under the receiver's
//! [`super::PEER_DATA_BUDGET`]; held application writes ≤ the receiver's `max-buffers`.

use super::{Effect, Inner, Volume};
use crate::meta::SbChange;
use crate::net::handshake::PeerParams;
use crate::net::{PeerData, Stream};
use crate::replica::{
    Admin, Event, Node, Outcome, PeerStartedRuns, ReadFor, RunStart, SourceEnd, SyncRole, TargetEnd,
};
use crate::resync::{
    Digest, Inbound, ReadOutcome, ResyncSummary, SourceConfig, TargetConfig, TickInput,
    VerifyConfig, VerifyProgress,
};
use crate::state::uuid::{random_uuid, UuidSet};
use crate::state::{ConnState, DiskState};
use crate::store::{AlignedBuf, SECTOR_SIZE};
use crate::wire::Packet;
use std::sync::Arc;
use std::time::Duration;

/// How long a new connection waits for the resync IO of the previous one to complete.
pub(crate) const SYNC_IO_DRAIN: Duration = Duration::from_secs(30);

/// Reads of the peer (`P_DATA_REQUEST`) a SyncTarget Primary has outstanding at once.
pub(crate) const MAX_REMOTE_READS: usize = 1024;

/// Reads this node serves for its peer at once; the data socket waits beyond it.
pub(crate) const MAX_PEER_READS: usize = 64;

/// Resync settings from the configuration.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// The rate controller.
    pub rate: crate::resync::RateConfig,
    /// `csums-alg crc32c` configured.
    pub csums: bool,
    /// `csums-after-crash-only`.
    pub csums_after_crash_only: bool,
    /// `verify-alg crc32c` configured.
    pub verify: bool,
    /// `use-rle`.
    pub use_rle: bool,
    /// `rs-discard-granularity`, bytes (0: no thin requests).
    pub rs_discard_granularity: u32,
    /// The after-split-brain policies.
    pub policy: crate::state::uuid::SplitBrainPolicy,
}

impl SyncSettings {
    /// The settings of `config`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        SyncSettings {
            rate: config.disk.rate,
            csums: config.net.csums_alg.is_some(),
            csums_after_crash_only: config.net.csums_after_crash_only,
            verify: config.net.verify_alg.is_some(),
            use_rle: config.net.use_rle,
            rs_discard_granularity: config.disk.rs_discard_granularity,
            policy: config.net.split_brain,
        }
    }
}

/// How a resync read ended.
pub(super) enum ReadResult {
    /// The data, with what its purpose needs computed from it.
    Data(ReadData),
    /// A hole of a file backend: zeroes, not read.
    Hole,
    /// The read failed.
    Failed,
}

/// A resync read's data and the CPU work on it — the digest and the all-zero scan, each
/// a pass over up to 1 MiB — done in the read's completion before it enters the volume's
/// lock, never under it.
pub(super) struct ReadData {
    buf: AlignedBuf,
    digest: Option<Digest>,
    all_zero: bool,
}

impl ReadData {
    /// Computes what `purpose` needs from `buf`.
    pub(super) fn new(buf: AlignedBuf, purpose: ReadFor) -> Self {
        let (digest, zero_check) = match purpose {
            ReadFor::Verify | ReadFor::TargetDigest => (true, false),
            ReadFor::Source { digest, zero_check } => (digest, zero_check),
        };
        ReadData {
            digest: digest.then(|| Digest::of(&buf)),
            all_zero: zero_check && buf.iter().all(|&x| x == 0),
            buf,
        }
    }
}

impl Volume {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn tick_input(&self, inner: &Inner) -> TickInput {
        let congested = inner
            .link
            .as_ref()
            .is_some_and(|l| l.congested(Stream::Resync));
        TickInput {
            now_ms: self.now_ms(),
            app_io_sectors: inner.app_io_sectors,
            app_waiting: inner.node.primary.stats().al_waiting > 0 || inner.node.runs.held() > 0,
            congested,
        }
    }

    // ----- the exchange (before the connection's tasks run) ----------------------------

    /// Step 1: the bitmap to send, as words, and its bit count. A full sync sets every
    /// bit first.
    pub(super) fn exchange_snapshot(&self, full: bool) -> (Vec<u64>, u64) {
        let mut g = self.lock();
        let oos = g.node.exchange_bitmap(full);
        (oos.words().to_vec(), oos.blocks())
    }

    /// Step 3 on the SyncSource: the new bitmap UUID, durably; returns the `P_SYNC_UUID`
    /// value.
    pub(super) async fn begin_sync_source(&self) -> Result<u64, String> {
        let (t, sync_uuid) = {
            let mut g = self.lock();
            let random = random_uuid(&mut rand::thread_rng());
            let (uuids, sync_uuid) = g.node.begin_sync_source(random);
            (
                self.stage_changes(&mut g, &[SbChange::Uuids(uuids)]),
                sync_uuid,
            )
        };
        self.meta.durable(t).await?;
        Ok(sync_uuid)
    }

    /// Step 3 on the SyncTarget: `replica::Node::sync_target_plan` (bitmap pages, then,
    /// in one superblock write, "not consistent" and the sync UUID), durable before the
    /// first resync write.
    pub(super) async fn begin_sync_target(&self, sync_uuid: u64) -> Result<(), String> {
        self.persist(Node::sync_target_plan(sync_uuid))
            .await
            .map_err(|e| format!("cannot start the resync on this disk: {e}"))
    }

    /// Waits (≤ [`SYNC_IO_DRAIN`]) until no resync read or write of an earlier
    /// connection is in flight, no end of a run is being recorded and none of the peer's
    /// writes is on the disk (DRBD, too, waits for the old connection's requests; a new
    /// target is told of any still there after the wait, `SyncRuns::start_target`).
    pub(super) async fn wait_sync_io_idle(&self) {
        use std::sync::atomic::Ordering;
        // Set before each check under the lock: a completion that makes the volume idle
        // after the check sees it and notifies.
        self.idle_wanted.store(true, Ordering::SeqCst);
        let idle = async {
            loop {
                let ended = self.sync_io_idle.notified();
                if Self::io_idle(&self.lock()) {
                    return;
                }
                ended.await;
            }
        };
        let drained = tokio::time::timeout(SYNC_IO_DRAIN, idle).await.is_ok();
        self.idle_wanted.store(false, Ordering::SeqCst);
        if !drained {
            tracing::warn!("resync IO or peer writes of the previous connection still in flight");
        }
    }

    /// No resync IO in flight, and every peer write received is on the disk (a lost
    /// connection's too: `request::Receiver` applies them after the loss).
    fn io_idle(inner: &Inner) -> bool {
        let rx = inner.node.receiver.stats();
        inner.node.runs.idle() && rx.active_writes == 0 && rx.held == 0
    }

    /// Wakes `wait_sync_io_idle` when it waits and the volume is idle (after a resync IO,
    /// the end of a run, a peer write's completion).
    pub(super) fn wake_if_idle(&self, inner: &Inner) {
        if self.idle_wanted.load(std::sync::atomic::Ordering::SeqCst) && Self::io_idle(inner) {
            self.sync_io_idle.notify_waiters();
        }
    }

    /// Step 4, from `connection_up`: how the run the handshake decided is configured
    /// (from this node's settings and the peer's parameters).
    pub(super) fn run_start(&self, inner: &Inner, role: SyncRole, peer: &PeerParams) -> RunStart {
        match role {
            SyncRole::Target { csums } => {
                let thin = peer.ctx.has(crate::wire::ff::DRBD_FF_THIN_RESYNC);
                RunStart::Target(TargetConfig {
                    max_bio_size: peer.max_bio_size & !4095,
                    csums,
                    thin_granularity: if thin {
                        self.sync.rs_discard_granularity
                    } else {
                        0
                    },
                    rate: self.sync.rate,
                    // The peer's writes in flight (≤ max-buffers) or, as Primary, this
                    // node's until retired (≤ 2 × max-buffers).
                    max_app_writes: 2 * self.max_buffers + 64,
                    ..TargetConfig::new(self.size_bytes / SECTOR_SIZE as u64)
                })
            }
            SyncRole::Source => RunStart::Source(self.source_config(inner)),
        }
    }

    /// The run `start` started (the connection's step took it): logged, reported, and
    /// the resync clock woken.
    pub(super) fn run_started(&self, inner: &mut Inner, start: &RunStart) {
        let oos = inner.node.primary.out_of_sync_bytes();
        let (role, csums) = match start {
            RunStart::Target(cfg) => ("SyncTarget", cfg.csums),
            RunStart::Source(_) => ("SyncSource", false),
        };
        tracing::info!(
            "resync started as {role}: {} KiB out of sync{}",
            oos / 1024,
            if csums { ", checksum-based" } else { "" }
        );
        self.sync_run_started.notify_one();
        inner.event(
            "resync-started",
            serde_json::json!({ "role": role, "out_of_sync_bytes": oos, "csums": csums }),
        );
    }

    /// The runs the peer's first packet may start on this connection
    /// ([`crate::replica::PeerStartedRuns`]): a source for an early resync request, this
    /// node's side of the peer's verify (with verify-alg).
    pub(super) fn peer_started_runs(&self, inner: &Inner) -> PeerStartedRuns {
        PeerStartedRuns {
            source: Some(self.source_config(inner)),
            verify: self.verify_config(0),
        }
    }

    fn source_config(&self, inner: &Inner) -> SourceConfig {
        SourceConfig {
            thin: inner
                .link
                .as_ref()
                .is_some_and(|l| l.ctx().has(crate::wire::ff::DRBD_FF_THIN_RESYNC)),
            max_app_writes: inner.node.primary.config().max_in_flight + 64,
            c_min_rate: self.sync.rate.c_min_rate,
            ..SourceConfig::new(self.size_bytes / SECTOR_SIZE as u64)
        }
    }

    /// The connection is gone: the node learns it ([`crate::replica::Node::connection_lost`]:
    /// the source ends, the target is cut — writes it holds go once the resync write they
    /// wait for is done — and both cores let go of the peer). Reads waiting for the peer
    /// fail.
    pub(super) fn node_connection_lost(&self, inner: &mut Inner, fx: &mut Vec<Effect>) {
        for (_, r) in inner.remote_reads.drain() {
            let _ = r.done.send(Err(crate::frontend::BlockError::Io));
        }
        let random = random_uuid(&mut rand::thread_rng());
        Self::feed_local(inner, Event::ConnectionLost { random });
        self.drain(inner, fx);
        inner.peer_waits.clear();
        inner.rs_bufs.clear();
        self.wake_if_idle(inner);
    }

    // ----- reads on a SyncTarget Primary ---------------------------------------------

    /// Whether a read must come from the peer ([`crate::replica::Node::reads_from_peer`]).
    pub(super) fn read_from_peer(&self, offset: u64, len: u32) -> bool {
        self.lock()
            .node
            .reads_from_peer(offset / SECTOR_SIZE as u64, len)
    }

    /// Reads `out.len()` bytes at `offset` from the peer in ≤ 1 MiB `P_DATA_REQUEST`s,
    /// into the caller's `out` (each reply is copied in), and gives it back filled.
    pub(super) async fn remote_read(
        &self,
        offset: u64,
        mut out: AlignedBuf,
    ) -> Result<AlignedBuf, crate::frontend::BlockError> {
        use crate::frontend::BlockError;
        let len = u32::try_from(out.len()).map_err(|_| BlockError::Invalid)?;
        let mut parts = Vec::new();
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(crate::wire::DRBD_MAX_BIO_SIZE);
            let (tx, rx) = tokio::sync::oneshot::channel();
            {
                let mut g = self.lock();
                let inner = &mut *g;
                if inner.link.is_none() {
                    return Err(BlockError::Io);
                }
                if inner.node.peer_disk != DiskState::UpToDate {
                    // Only an UpToDate peer has the blocks this node lacks.
                    return Err(BlockError::Io);
                }
                if inner.remote_reads.len() >= MAX_REMOTE_READS {
                    return Err(BlockError::Busy);
                }
                let id = inner.next_read_id;
                inner.next_read_id += 1;
                let pkt = Packet::BlockReq {
                    cmd: crate::wire::Command::P_DATA_REQUEST,
                    req: crate::wire::BlockReq {
                        sector: (offset + u64::from(done)) / SECTOR_SIZE as u64,
                        block_id: id,
                        blksize: n,
                        pad: 0,
                    },
                    digest: Vec::new(),
                };
                if !Self::send(inner, Stream::Data, &pkt, None) {
                    return Err(BlockError::Io);
                }
                inner
                    .remote_reads
                    .insert(id, super::RemoteRead { len: n, done: tx });
            }
            parts.push(rx);
            done += n;
        }
        let mut at = 0usize;
        for rx in parts {
            let buf = rx.await.map_err(|_| BlockError::Io)??;
            let end = at + buf.len();
            out.as_mut_slice()
                .get_mut(at..end)
                .ok_or(BlockError::Io)?
                .copy_from_slice(&buf);
            at = end;
        }
        Ok(out)
    }

    /// `P_DATA_REPLY` for one of this node's reads.
    pub(super) fn data_reply(
        &self,
        session: u64,
        block_id: u64,
        data: PeerData,
    ) -> Result<(), String> {
        self.with_session(session, |_, inner, _| {
            let r = inner
                .remote_reads
                .remove(&block_id)
                .ok_or_else(|| format!("P_DATA_REPLY for unknown read {block_id:#x}"))?;
            r.complete(data.buf)
        })
        .map(|_| ())
    }

    /// `P_NEG_DREPLY`: the peer could not read.
    pub(super) fn remote_read_failed(&self, inner: &mut Inner, block_id: u64) {
        if let Some(r) = inner.remote_reads.remove(&block_id) {
            tracing::warn!("the peer failed a read for this node");
            let _ = r.done.send(Err(crate::frontend::BlockError::Io));
        }
    }

    /// The peer's `P_DATA_REQUEST`: read locally and answer `P_DATA_REPLY` (or
    /// `P_NEG_DREPLY`). At most `MAX_PEER_READS` (64) at once: the caller (the data socket's
    /// reader) waits here beyond that.
    pub(super) async fn peer_read_request(
        &self,
        session: u64,
        sector: u64,
        len: u32,
        block_id: u64,
    ) -> Result<(), String> {
        let sectors = self.size_bytes / SECTOR_SIZE as u64;
        if len == 0
            || !len.is_multiple_of(512)
            || len > crate::wire::DRBD_MAX_BIO_SIZE
            || sector.saturating_add(u64::from(len / 512)) > sectors
        {
            return Err(format!("P_DATA_REQUEST of {len} bytes at sector {sector}"));
        }
        let permit = self
            .peer_reads
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let Some(me) = self.me.upgrade() else {
            return Ok(());
        };
        tokio::spawn(async move {
            let r = me
                .store
                .read(sector * SECTOR_SIZE as u64, len as usize)
                .await;
            let _ = me.with_session(session, |_, inner, _| {
                let (pkt, data, stream) = match r {
                    Ok(buf) => (
                        Packet::Data {
                            cmd: crate::wire::Command::P_DATA_REPLY,
                            head: crate::wire::DataHeader {
                                sector,
                                block_id,
                                seq_num: 0,
                                dp_flags: 0,
                            },
                            digest: Vec::new(),
                            data_len: len,
                        },
                        Some(Arc::new(buf)),
                        Stream::Data,
                    ),
                    Err(e) => {
                        tracing::warn!("read for the peer at sector {sector} failed: {e}");
                        (
                            Packet::BlockAck {
                                cmd: crate::wire::Command::P_NEG_DREPLY,
                                ack: crate::wire::BlockAck {
                                    sector,
                                    block_id,
                                    blksize: len,
                                    seq_num: 0,
                                },
                            },
                            None,
                            Stream::Meta,
                        )
                    }
                };
                Self::send(inner, stream, &pkt, data);
                Ok(())
            });
            drop(permit);
        });
        Ok(())
    }

    // ----- the run ---------------------------------------------------------------------

    /// One step of the resync clock (every 100 ms); returns whether a run still needs it
    /// (a target, a source, or this node's verify), so the ticker sleeps until the next
    /// run starts.
    pub(super) fn sync_tick(&self, session: u64) -> bool {
        let running = self.with_session(session, |v, inner, fx| {
            let tick = v.tick_input(inner);
            let outcome = Self::step(inner, Event::SyncTick(tick))?;
            v.drain(inner, fx);
            Ok(outcome == Outcome::Ticked { running: true })
        });
        matches!(running, Ok(Some(true)))
    }

    /// Flushes the data device; the bitmap's clears made before it may then reach the
    /// disk ([`crate::request::OutOfSync::begin_flush`]).
    pub(super) async fn flush_clears(&self) -> bool {
        let id = self.lock().node.primary.out_of_sync_mut().begin_flush();
        let ok = self.flush_local().await;
        if let Some(id) = id {
            self.lock()
                .node
                .primary
                .out_of_sync_mut()
                .flush_done(id, ok);
        }
        ok
    }

    /// A resync or verify packet without data, from either socket
    /// ([`Event::SyncPacket`]). A request the run has no room for waits (the socket is
    /// not read meanwhile) until a completion makes room.
    pub(super) async fn sync_inbound(&self, session: u64, inbound: Inbound) -> Result<(), String> {
        loop {
            let notified = self.accept.notified();
            let done = self.with_session(session, |v, inner, fx| {
                let tick = v.tick_input(inner);
                let clocked =
                    inner.node.runs.source().is_some() || inner.node.runs.verify_running();
                let outcome = Self::step(inner, Event::SyncPacket { inbound, tick })?;
                if !clocked
                    && (inner.node.runs.source().is_some() || inner.node.runs.verify_running())
                {
                    // The peer's packet started a run: the clock wakes for it.
                    v.sync_run_started.notify_one();
                }
                v.drain(inner, fx);
                Ok(outcome != Outcome::Full)
            })?;
            match done {
                None | Some(true) => return Ok(()),
                Some(false) => notified.await,
            }
        }
    }

    /// `P_RS_DATA_REPLY` with its data ([`Event::SyncDataReply`]).
    pub(super) fn rs_data_reply(
        &self,
        session: u64,
        sector: u64,
        len: u32,
        data: PeerData,
    ) -> Result<(), String> {
        self.with_session(session, |v, inner, fx| {
            if let Outcome::SyncWrite { run, tag } =
                Self::step(inner, Event::SyncDataReply { sector, len })?
            {
                fx.push(Effect::SyncWrite {
                    run,
                    tag,
                    sector,
                    len,
                    data: Some(data),
                });
            }
            v.drain(inner, fx);
            Ok(())
        })
        .map(|_| ())
    }

    /// [`crate::replica::Action::SendSync`]: the packet, with the buffer of the source
    /// read `reply` names (a reply whose buffer is gone is not sent: its read's run ended).
    pub(super) fn send_sync(inner: &mut Inner, stream: Stream, pkt: &Packet, reply: Option<u64>) {
        let data = match reply {
            Some(tag) => match inner.rs_bufs.remove(&tag) {
                Some(b) => Some(b),
                None => return,
            },
            None => None,
        };
        let bytes = data.as_ref().map_or(0, |d| d.len() as u64);
        if Self::send(inner, stream, pkt, data) {
            inner.resync_bytes_sent += bytes;
        }
    }

    /// Online verify ended (either side): reported, and the connection is Connected
    /// again.
    pub(super) fn verify_finished(
        &self,
        inner: &mut Inner,
        p: VerifyProgress,
        crash_repaired: bool,
    ) {
        tracing::info!(
            "online verify finished: {} of {} blocks out of sync{}",
            p.out_of_sync_blocks,
            p.total_blocks,
            if p.out_of_sync_blocks > 0 {
                " (marked; a disconnect/connect with a Primary resyncs them)"
            } else {
                ""
            }
        );
        inner.event(
            "verify-finished",
            serde_json::json!({
                "out_of_sync_blocks": p.out_of_sync_blocks,
                "ranges": p.ranges
            }),
        );
        inner.last_verify = Some(p);
        if crash_repaired {
            self.crash_repaired();
        }
    }

    /// `verify`: compares every block with the peer's by digest (this node is VerifyS;
    /// the checks are `replica::Node::start_verify`'s).
    pub fn start_verify(&self) -> Result<(), String> {
        let tick = self.tick_input(&self.lock());
        self.admin_now(Admin::Verify { tick })?;
        self.sync_run_started.notify_one();
        tracing::info!("online verify started");
        Ok(())
    }

    /// The verify run's configuration from `sector`; `None` without verify-alg.
    fn verify_config(&self, sector: u64) -> Option<VerifyConfig> {
        self.sync.verify.then(|| VerifyConfig {
            start_sector: sector,
            rate: self.sync.rate,
            ..VerifyConfig::new(self.size_bytes / SECTOR_SIZE as u64)
        })
    }

    /// The target's run is over. With nothing left, the end is recorded on disk (data
    /// flushed, bitmap written, UUIDs adopted, consistent) before the disk says UpToDate.
    pub(super) fn target_finished(
        &self,
        inner: &mut Inner,
        run: u64,
        summary: ResyncSummary,
        adopt: Option<UuidSet>,
        fx: &mut Vec<Effect>,
    ) {
        tracing::info!(
            "resync finished: {} KiB total, {} KiB failed, {} KiB left, {} KiB equal by checksum, \
             {} s at {} KiB/s",
            summary.total_blocks * 4,
            summary.failed_blocks * 4,
            summary.left_blocks * 4,
            summary.same_csum_blocks * 4,
            summary.active_ms / 1000,
            summary.rate_kib
        );
        inner.last_sync = Some(summary);
        inner.event("resync-finished", serde_json::json!(summary));
        fx.push(Effect::SyncFinish(inner.node.target_end(run, adopt)));
    }

    /// Records the end of a target run: `replica::Node::target_end_plan` (the data
    /// flushed, the pages, then "consistent", the completing UUIDs and the crash repaired
    /// in one superblock write, adopted in memory when staged — unless the UUIDs changed
    /// meanwhile, when the next handshake decides instead). A failed superblock write is
    /// the disk's error (the data is in sync; the writes wait at the gate).
    pub(super) async fn finish_target(&self, end: TargetEnd) {
        let recorded = self
            .persist(Node::target_end_plan(end))
            .await
            .map_err(|e| format!("cannot record the end of the resync: {e}"));
        let mut g = self.lock();
        let inner = &mut *g;
        if let Err(e) = &recorded {
            tracing::error!("{e}; the disk stays Inconsistent");
        }
        let durable = recorded.is_ok() && end.uuids.is_some();
        if inner.node.target_end_recorded(&end, durable) {
            self.crash_repaired();
        }
        self.wake_if_idle(inner);
        self.send_state(inner);
    }

    /// A connection loss interrupted an online verify
    /// ([`crate::replica::Action::VerifyInterrupted`]).
    pub(super) fn verify_interrupted(inner: &mut Inner, p: VerifyProgress) {
        tracing::warn!(
            "online verify interrupted at sector {} ({} of {} blocks, {} out of sync)",
            p.resume_sector,
            p.done_blocks,
            p.total_blocks,
            p.out_of_sync_blocks
        );
        inner.last_verify = Some(p);
    }

    /// The peer ended the run this node served as SyncSource
    /// ([`crate::replica::Action::SourceEnded`]): complete when its disk is UpToDate
    /// (the bitmap UUID then rotates into history, DRBD's `drbd_resync_finished` on the
    /// source), durable in the background.
    pub(super) fn source_ended(&self, inner: &mut Inner, end: SourceEnd) {
        if end.uuids.is_some() {
            // Durable in the background (application writes wait for it at the core's
            // door), with the crash repaired in the same superblock write.
            let _ = self.stage_changes(inner, &end.durable());
            tracing::info!("resync finished (this node was SyncSource)");
            if end.unfetched > 0 {
                tracing::error!(
                    "BUG: the peer ended its resync UpToDate, but {} blocks are still out of \
                     sync here that it never fetched; a disconnect/connect of the Primary \
                     resyncs them",
                    end.unfetched
                );
                inner.event(
                    "resync-unfetched",
                    serde_json::json!({ "blocks": end.unfetched }),
                );
            }
            inner.event("resync-finished", serde_json::json!({"role": "SyncSource"}));
        }
        if end.crash_repaired {
            self.crash_repaired();
        }
    }

    /// The crashed-Primary flag was cleared (`replica::Node::reached_connected`): a
    /// crash of this node as Primary is repaired, and the superblock says so (in the
    /// background, like every superblock change).
    pub(super) fn crash_repaired(&self) {
        tracing::info!("the crash of this node as Primary is repaired");
        let _ = self.meta.stage(&[SbChange::ClearCrashedPrimary]);
    }

    /// A resync read completed ([`Event::SyncReadDone`]); the runs' actions are
    /// performed.
    pub(super) fn sync_read_done(
        &self,
        inner: &mut Inner,
        (run, tag, purpose): (u64, u64, ReadFor),
        read: ReadResult,
        fx: &mut Vec<Effect>,
    ) {
        let hole = matches!(read, ReadResult::Hole);
        let outcome = match read {
            ReadResult::Data(d) => {
                if matches!(purpose, ReadFor::Source { .. }) {
                    // Taken by the `P_RS_DATA_REPLY` this read may answer, dropped below
                    // otherwise.
                    inner.rs_bufs.insert(tag, Arc::new(d.buf));
                }
                ReadOutcome::Ok {
                    all_zero: d.all_zero,
                    digest: d.digest,
                }
            }
            // (A hole has no digest: a digest read of one fails.)
            ReadResult::Hole => ReadOutcome::Ok {
                all_zero: true,
                digest: None,
            },
            ReadResult::Failed => ReadOutcome::Failed,
        };
        let ev = Event::SyncReadDone {
            run,
            tag,
            purpose,
            outcome,
        };
        Self::feed_local(inner, ev);
        if hole && matches!(purpose, ReadFor::Source { .. }) {
            inner.hole_reads_skipped += 1;
        }
        // A source's reply to this read takes its buffer in the drain; an unused buffer is
        // dropped after it (`rs_bufs` holds buffers only during this call).
        self.drain(inner, fx);
        if matches!(purpose, ReadFor::Source { .. }) {
            inner.rs_bufs.remove(&tag);
        }
        self.wake_if_idle(inner);
    }

    /// A resync write completed ([`Event::SyncWriteDone`]).
    pub(super) fn sync_write_done(
        &self,
        inner: &mut Inner,
        run: u64,
        tag: u64,
        ok: bool,
        fx: &mut Vec<Effect>,
    ) {
        Self::feed_local(inner, Event::SyncWriteDone { run, tag, ok });
        self.drain(inner, fx);
        self.wake_if_idle(inner);
    }

    /// `connect --discard-my-data`: the next handshake says this node loses a split
    /// brain (P_UUIDS flag 1). Cleared when a connection is made.
    pub fn set_discard_my_data(&self, discard: bool) {
        if let Err(e) = self.admin_now(Admin::DiscardMyData(discard)) {
            tracing::error!("discard-my-data: {e}");
        }
    }

    /// `invalidate`: this Secondary's data is declared invalid. Every bit is set and
    /// written, the disk becomes Inconsistent (durably), and the connection is renewed:
    /// the handshake then makes this node the SyncTarget of a full resync.
    pub async fn invalidate(&self) -> Result<(), String> {
        self.admin(Admin::Invalidate).await
    }

    /// `new-current-uuid` (`clear_bitmap`: `--clear-bitmap`, a fresh pair's initial sync
    /// skipped): through the node ([`Admin::NewCurrentUuid`]), one at a time with role
    /// changes.
    pub async fn new_current_uuid(&self, clear_bitmap: bool) -> Result<(), String> {
        let _one = self.role_change.lock().await;
        let random = random_uuid(&mut rand::thread_rng());
        self.admin(Admin::NewCurrentUuid {
            clear_bitmap,
            random,
        })
        .await
    }

    /// `P_UUIDS` on a live connection: the peer skipped the initial sync
    /// (`new-current-uuid --clear-bitmap`); anything else is ignored, as DRBD 8.4 does
    /// outside the handshake.
    pub(super) fn peer_uuids(&self, session: u64, p: crate::state::uuid::UuidPacket) {
        let _ = self.with_session(session, |v, inner, fx| {
            Self::feed_local(inner, Event::PeerUuids(p));
            v.drain(inner, fx);
            Ok(())
        });
    }

    /// The handshake resolved a split brain (by policy or discard-my-data): shown in
    /// status (`split_brain_resolved`, the last one) and as an event.
    pub(super) fn split_brain_resolved(&self, why: String) {
        let mut g = self.lock();
        g.event("split-brain-resolved", serde_json::json!({ "how": why }));
        g.split_brain_resolved = Some(why);
    }

    /// `pause-sync` / `resume-sync`.
    pub fn set_sync_paused(&self, paused: bool) {
        let now_ms = self.now_ms();
        if let Err(e) = self.admin_now(Admin::PauseSync { paused, now_ms }) {
            tracing::error!("pause-sync: {e}");
        }
    }

    /// The `resync` object of the status.
    pub(super) fn sync_status(&self, inner: &Inner) -> serde_json::Value {
        if let Some(t) = inner.node.runs.target() {
            let p = t.progress(inner.node.primary.out_of_sync());
            return serde_json::json!({
                "role": "SyncTarget",
                "paused": p.paused,
                "out_of_sync_bytes": p.left_blocks * 4096,
                "total_bytes": p.total_blocks * 4096,
                "percent": f64::from(p.permille) / 10.0,
                "rate_kib": p.rate_kib,
                "planned_rate_kib": p.planned_rate_kib,
                "eta_s": p.eta_secs,
                "data_bytes_received": p.data_bytes,
                "same_csum_bytes": p.same_csum_blocks * 4096,
                "deallocated_bytes": p.deallocated_bytes,
                "requests_in_flight": p.requests_in_flight,
                "failed_bytes": p.failed_blocks * 4096,
                "throttled_steps": p.throttled_steps,
            });
        }
        if let (Some(src), ConnState::SyncSource) = (inner.node.runs.source(), inner.node.conn) {
            let s = src.stats();
            return serde_json::json!({
                "role": "SyncSource",
                "paused": inner.node.runs.paused(),
                "out_of_sync_bytes": inner.node.primary.out_of_sync_bytes(),
                "data_bytes_sent": s.data_bytes,
                "same_csum_bytes": s.same_csum_bytes,
                "deallocated_bytes": s.deallocated_bytes,
                "requests": s.requests,
                "throttled_steps": s.throttled_steps,
            });
        }
        serde_json::Value::Null
    }

    /// The `verify` object of the status (the running one, either side).
    pub(super) fn verify_status(inner: &Inner) -> serde_json::Value {
        match inner.node.runs.verify_progress() {
            Some((role, p)) => {
                let mut j = serde_json::to_value(p).unwrap_or_default();
                if let Some(m) = j.as_object_mut() {
                    m.insert("role".into(), role.into());
                }
                j
            }
            None => serde_json::Value::Null,
        }
    }
}
