//! A live connection: the handshake, then four tasks (data/meta × send/receive) and a
//! watchdog until one fails.
//!
//! Liveness (DRBD 8.4's `timeout`, `ko-count`, `ping-int`, `ping-timeout`; the rules are in
//! [`super::liveness`]): the watchdog pings the peer when the meta socket is idle for
//! `ping-int`, when a write has waited `timeout` for the peer, or when a sender has been
//! blocked `timeout` on a full socket, and drops the connection when a ping goes
//! unanswered for `ping-timeout` or a write waits `ko-count × timeout`. Each socket write
//! is bounded by `timeout`: on the meta socket one expiry drops the connection, on the data
//! socket each expiry requests a ping and `ko-count` expiries in one batch drop it (DRBD's
//! `drbd_send` and `we_should_drop_the_connection`).
//!
//! The end: the first task to end stops the others; the sockets then send their FIN
//! and read (and drop) what the peer still sends until it closes too, at most 2 s and
//! 64 MiB ([`linger`]), so the peer reads this side's last packets (a `P_STATE`, a
//! `P_NEG_ACK`) instead of failing a write on a reset connection first.

use super::handshake::{self, Agreed, PeerParams};
use super::link::Watch;
use super::liveness::{Dead, Liveness, LivenessConfig, Observation, Step};
use super::{
    read_exact, Link, LinkEvent, NetError, Outgoing, PeerEvent, PeerWrite, PeerWriteKind, Replica,
    SourceStart, Stream,
};
use crate::config::{Config, NodeConfig};
use crate::request::OutOfSync;
use crate::resync::{Inbound, SLEEP_TIME_MS};
use crate::state::uuid::HandshakeOutcome;
use crate::wire::{self, dp, BitmapReceiver, BitmapSender, Command, Header, Packet, WireCtx};
use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Packets a sender task writes with one `writev`.
const MAX_BATCH: usize = 64;

/// Receive buffer of each socket reader. One `recv` then takes a packet's header,
/// sub-header and (for a 4 KiB write) its data together, and often the next packet too,
/// instead of one `recv` per part: at QD1 that was 3 of the ~8 `recv`s per write on the
/// Secondary. Reads larger than the buffer bypass it once it is empty, so a 1 MiB
/// `P_DATA` still lands in its own buffer without a copy for most of its bytes.
const READ_BUFFER: usize = 16 << 10;

/// A socket's read half behind [`READ_BUFFER`].
type Reader = BufReader<OwnedReadHalf>;

/// Handshake, then serve the connection until it fails. Returns why it ended.
pub async fn run<R: Replica>(
    replica: Arc<R>,
    config: &Config,
    peer: &NodeConfig,
    sockets: (TcpStream, TcpStream),
    resolve_conflicts: bool,
    session: u64,
    established: &mut bool,
) -> Result<(), NetError> {
    let (mut data, meta) = sockets;
    let (params, agreed) = handshake(&*replica, &mut data, resolve_conflicts).await?;
    let ctx = params.ctx;
    // An old run's resync write must not land after this connection's writes.
    replica.wait_sync_io_idle().await;
    let start = exchange(&mut data, &*replica, &ctx, agreed.sync).await?;
    // Sends in a queue: at most every un-acked write (2 × max-buffers) plus one barrier
    // per epoch among them, so 4 × max-buffers (+ pings, state) never fills it.
    let queue = config.net.max_buffers as usize * 4 + 64;
    let (data_tx, data_rx) = mpsc::channel(queue);
    let (meta_tx, meta_rx) = mpsc::channel(queue);
    let link = Link::new(ctx, data_tx, meta_tx, session);
    tracing::info!(
        "connected to {} ({}): role {}, disk {}, protocol {}, agreed version {}, sync decision \
         {:?}",
        peer.name,
        peer.address,
        params.role,
        params.disk,
        config.resource.protocol,
        ctx.version(),
        agreed.sync
    );
    *established = true;
    replica.link_event(LinkEvent::Error(None));
    let kill = replica.connection_up(link.clone(), &params, &agreed, resolve_conflicts, start);

    let kept = [keep(&data), keep(&meta)];
    let (data_rd, data_wr) = data.into_split();
    let (meta_rd, meta_wr) = meta.into_split();
    let live = Arc::new(Live::new(link.watch()));
    let limits = |meta| SendLimits {
        timeout: config.net.timeout,
        ko_count: config.net.ko_count,
        meta,
        live: live.clone(),
    };
    let mut tasks: JoinSet<Result<(), NetError>> = JoinSet::new();
    tasks.spawn(sender(
        data_wr,
        data_rx,
        replica.clone(),
        session,
        limits(false),
    ));
    tasks.spawn(sender(
        meta_wr,
        meta_rx,
        replica.clone(),
        session,
        limits(true),
    ));
    tasks.spawn(data_receiver(
        BufReader::with_capacity(READ_BUFFER, data_rd),
        ctx,
        replica.clone(),
        session,
    ));
    tasks.spawn(meta_receiver(
        BufReader::with_capacity(READ_BUFFER, meta_rd),
        ctx,
        replica.clone(),
        link.clone(),
        live.clone(),
        session,
    ));
    tasks.spawn(watchdog(
        link.clone(),
        live,
        replica.clone(),
        LivenessConfig {
            ping_int: config.net.ping_interval,
            ping_timeout: config.net.ping_timeout,
            timeout: config.net.timeout,
            ko_count: config.net.ko_count,
        },
    ));
    tasks.spawn(ticker(replica.clone(), session));
    // The replica asks for the connection to go (disconnect, a failed flush, a full queue).
    tasks.spawn(async move {
        kill.notified().await;
        Err(NetError::Shutdown)
    });
    end(tasks, kept).await
}

/// The handshake on `data`, then the replica's decision on it.
async fn handshake<R: Replica>(
    replica: &R,
    data: &mut TcpStream,
    resolve_conflicts: bool,
) -> Result<(PeerParams, Agreed), NetError> {
    let local = replica.handshake_params(resolve_conflicts);
    let params = tokio::time::timeout(super::HANDSHAKE_TIMEOUT, handshake::run(data, local))
        .await
        .map_err(|_| NetError::Timeout("handshake"))??;
    let agreed = replica.agree(&local, &params)?;
    if let Some(why) = &agreed.split_brain_resolved {
        tracing::warn!("{why}");
        replica.link_event(LinkEvent::SplitBrainResolved(why.clone()));
    }
    Ok((params, agreed))
}

/// The first task to end ends the connection: the others are stopped, the sockets
/// linger ([`linger`]). Returns why it ended.
async fn end(
    mut tasks: JoinSet<Result<(), NetError>>,
    kept: [Option<OwnedFd>; 2],
) -> Result<(), NetError> {
    let first = tasks.join_next().await;
    tasks.shutdown().await;
    tokio::spawn(linger(kept));
    match first {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(NetError::Protocol(format!("connection task failed: {e}"))),
        None => Ok(()),
    }
}

/// How long an ended connection's sockets stay open for the peer to close its side.
const LINGER: Duration = Duration::from_secs(2);
/// What an ended connection reads (and drops) at most while it lingers.
const LINGER_BYTES: usize = 64 << 20;

/// A second descriptor of `s`, so the socket outlives the connection's tasks (see
/// [`linger`]). `None` if the process is out of descriptors: then the socket closes with
/// the tasks, as it did before.
fn keep(s: &TcpStream) -> Option<OwnedFd> {
    s.as_fd().try_clone_to_owned().ok()
}

/// The graceful end of a connection: each socket sends its FIN after what is queued,
/// then reads and drops what the peer still sends until the peer closes too, at most
/// [`LINGER`] and [`LINGER_BYTES`]. Closing a socket with unread data makes the kernel
/// reset the connection, and a reset drops what the peer had received but not yet read
/// — the last `P_STATE` (this disk failed), a `P_NEG_ACK`, a state change reply. Seen:
/// 2 of 8 runs of `a_secondary_whose_disk_failed_cannot_be_promoted` lost that
/// `P_STATE` when the connection ended at once.
async fn linger(kept: [Option<OwnedFd>; 2]) {
    let one = |fd: Option<OwnedFd>| async move {
        let std = std::net::TcpStream::from(fd?);
        let _ = std.shutdown(std::net::Shutdown::Write);
        let mut s = TcpStream::from_std(std).ok()?;
        let mut buf = vec![0u8; 64 << 10];
        let mut read = 0usize;
        let drain = async {
            while read < LINGER_BYTES {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
        Some(())
    };
    let [a, b] = kept;
    let _ = tokio::join!(one(a), one(b));
}

/// Time the bitmap exchange and the sync UUID may take (a 1 TiB replica's uncompressed
/// bitmap is 32 MiB).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// The bitmap exchange and the sync UUID (see `replica::sync`): WFBitMapS sends first,
/// WFBitMapT receives first; both OR-merge. The source's sync UUID is made durable here
/// and sent by `connection_up`, after `P_OUT_OF_SYNC` for the blocks the Primary marked
/// while the bitmaps crossed ([`SourceStart`]). The target takes those wherever they
/// come before `P_SYNC_UUID` (DRBD sends them while WFBitMapS, so possibly before its
/// bitmap) and merges them with the source's bitmap.
/// Nothing when the handshake decided no resync; bounded by [`EXCHANGE_TIMEOUT`].
async fn exchange<R: Replica>(
    data: &mut TcpStream,
    replica: &R,
    ctx: &WireCtx,
    sync: HandshakeOutcome,
) -> Result<Option<SourceStart>, NetError> {
    let (source, full) = match sync {
        HandshakeOutcome::SyncSource { full } => (true, full),
        HandshakeOutcome::SyncTarget { full } => (false, full),
        HandshakeOutcome::Connected | HandshakeOutcome::Disconnect(_) => return Ok(None),
    };
    tokio::time::timeout(
        EXCHANGE_TIMEOUT,
        exchange_bitmaps(data, replica, ctx, source, full),
    )
    .await
    .map_err(|_| NetError::Timeout("bitmap exchange"))?
}

async fn exchange_bitmaps<R: Replica>(
    data: &mut TcpStream,
    replica: &R,
    ctx: &WireCtx,
    source: bool,
    full: bool,
) -> Result<Option<SourceStart>, NetError> {
    let use_rle = replica.use_rle();
    let (words, bm_bits) = replica.exchange_snapshot(full);
    let mut peer = vec![0u64; words.len()];
    if source {
        send_bitmap(data, &words, bm_bits, ctx, use_rle).await?;
        receive_bitmap(data, &mut peer, bm_bits, ctx, None).await?;
        merged(replica, &peer, None);
        let sync_uuid = replica
            .begin_sync_source()
            .await
            .map_err(NetError::Protocol)?;
        for (k, sent) in peer.iter_mut().zip(&words) {
            *k |= sent;
        }
        return Ok(Some(SourceStart {
            known: peer,
            sync_uuid,
        }));
    }
    let mut told = OutOfSync::new(bm_bits.saturating_mul(8));
    receive_bitmap(data, &mut peer, bm_bits, ctx, Some(&mut told)).await?;
    send_bitmap(data, &words, bm_bits, ctx, use_rle).await?;
    let uuid = loop {
        match super::read_control(data, ctx).await? {
            (_, Packet::SyncUuid(u)) => break u,
            (_, Packet::State(_)) => {}
            (_, Packet::BlockDesc { cmd, desc }) if cmd == Command::P_OUT_OF_SYNC => {
                mark_told(&mut told, &desc)?;
            }
            (hdr, _) => {
                return Err(NetError::Protocol(format!(
                    "expected P_SYNC_UUID, got {}",
                    hdr.command.name()
                )))
            }
        }
    };
    for (p, t) in peer.iter_mut().zip(told.words()) {
        *p |= t;
    }
    merged(replica, &peer, Some(told.count()));
    replica
        .begin_sync_target(uuid)
        .await
        .map_err(NetError::Protocol)?;
    Ok(None)
}

/// ORs the peer's bitmap (on a target with the blocks the source told, `told` of them)
/// into the replica's.
fn merged<R: Replica>(replica: &R, peer: &[u64], told: Option<u64>) {
    let added = replica.merge_peer_bitmap(peer);
    let told = told.map_or(String::new(), |n| format!(" ({n} told by P_OUT_OF_SYNC)"));
    tracing::info!("bitmap exchange: the peer's bitmap added {added} out-of-sync blocks{told}");
}

/// A `P_OUT_OF_SYNC` before `P_SYNC_UUID`: marks its blocks in `told`
/// ([`OutOfSync::mark_checked`]); a range it refuses is a protocol error.
fn mark_told(told: &mut OutOfSync, desc: &wire::BlockDesc) -> Result<(), NetError> {
    told.mark_checked(desc.sector, desc.blksize).map_err(|e| {
        NetError::Protocol(format!(
            "P_OUT_OF_SYNC of {} bytes at sector {} is not a range of this volume ({e})",
            desc.blksize, desc.sector
        ))
    })
}

async fn send_bitmap(
    data: &mut TcpStream,
    words: &[u64],
    bm_bits: u64,
    ctx: &WireCtx,
    use_rle: bool,
) -> Result<(), NetError> {
    let mut sender = BitmapSender::new(words, bm_bits, ctx, use_rle)
        .map_err(|e| NetError::Protocol(format!("bitmap: {e}")))?;
    let mut out = Vec::with_capacity(68 << 10);
    while let Some(pkt) = sender.next_packet() {
        wire::encode(&pkt, ctx, 0, &mut out)?;
        if out.len() >= 64 << 10 {
            data.write_all(&out).await?;
            out.clear();
        }
    }
    data.write_all(&out).await?;
    if let Some(line) = sender.stats().info_line("send") {
        tracing::info!("{line}");
    }
    Ok(())
}

/// Receives the peer's bitmap into `peer`; a target (`told`: where) also takes the
/// source's `P_OUT_OF_SYNC` packets, which may precede it.
async fn receive_bitmap(
    data: &mut TcpStream,
    peer: &mut [u64],
    bm_bits: u64,
    ctx: &WireCtx,
    mut told: Option<&mut OutOfSync>,
) -> Result<(), NetError> {
    let mut rx = BitmapReceiver::new(bm_bits, ctx)
        .map_err(|e| NetError::Protocol(format!("bitmap: {e}")))?;
    loop {
        let (hdr, pkt) = super::read_control(data, ctx).await?;
        match pkt {
            Packet::State(_) => {}
            Packet::BlockDesc { cmd, desc } if cmd == Command::P_OUT_OF_SYNC && told.is_some() => {
                if let Some(t) = told.as_deref_mut() {
                    mark_told(t, &desc)?;
                }
            }
            Packet::Bitmap(_) | Packet::CompressedBitmap(_) => {
                if rx
                    .receive_packet(peer, &pkt)
                    .map_err(|e| NetError::Protocol(format!("bitmap: {e}")))?
                {
                    break;
                }
            }
            _ => {
                return Err(NetError::Protocol(format!(
                    "unexpected {} during the bitmap exchange",
                    hdr.command.name()
                )))
            }
        }
    }
    if let Some(line) = rx.stats().info_line("receive") {
        tracing::info!("{line}");
    }
    Ok(())
}

/// The resync controller's clock: a step every 100 ms while a run needs it.
async fn ticker<R: Replica>(replica: Arc<R>, session: u64) -> Result<(), NetError> {
    let mut iv = tokio::time::interval(Duration::from_millis(SLEEP_TIME_MS));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        if !replica.tick(session) {
            // No run: no clock until one starts (an idle connection makes no wake-ups).
            replica.wait_sync_run().await;
            iv.reset();
        }
    }
}

/// What the connection's tasks share for the watchdog.
struct Live {
    started: Instant,
    /// Milliseconds from `started` to the last packet on the meta socket.
    last_rx_ms: AtomicU64,
    /// `P_PING_ACK`s received.
    ping_acks: AtomicU64,
    /// A sender was blocked for `timeout` and asks for a ping.
    ping_wanted: AtomicBool,
    /// Wakes the watchdog (a blocked sender; the link for a write that starts waiting).
    watch: Arc<Watch>,
}

impl Live {
    fn new(watch: Arc<Watch>) -> Self {
        Live {
            started: Instant::now(),
            last_rx_ms: AtomicU64::new(0),
            ping_acks: AtomicU64::new(0),
            ping_wanted: AtomicBool::new(false),
            watch,
        }
    }

    fn received(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_rx_ms.store(ms, Ordering::Relaxed);
    }

    fn last_rx(&self) -> Instant {
        self.started + Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed))
    }

    /// DRBD's `request_ping`.
    fn request_ping(&self) {
        self.ping_wanted.store(true, Ordering::Relaxed);
        self.watch.wake.notify_one();
    }
}

/// How long one socket write may block, and what an expiry does (DRBD's `sk_sndtimeo` =
/// `timeout` and `we_should_drop_the_connection`).
struct SendLimits {
    timeout: Duration,
    ko_count: u32,
    /// The meta socket: one expiry drops the connection.
    meta: bool,
    live: Arc<Live>,
}

/// Writes queued packets, batching up to [`MAX_BATCH`] per `writev`.
async fn sender<R: Replica>(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outgoing>,
    replica: Arc<R>,
    session: u64,
    limits: SendLimits,
) -> Result<(), NetError> {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH);
    loop {
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return Err(NetError::Shutdown);
        }
        write_batch(&mut wr, &batch, &limits).await?;
        let bytes: usize = batch
            .iter()
            .map(|i| i.bytes.len() + i.data.as_ref().map_or(0, |d| d.len()))
            .sum();
        replica.count_tx(bytes as u64);
        for item in batch.drain(..) {
            if let Some(id) = item.sent_id {
                replica.handed_to_network(session, id);
            }
            if let Some(w) = item.written {
                let _ = w.send(());
            }
        }
    }
}

/// Writes every packet of `batch` (header + optional data) with vectored writes, each
/// bounded by `limits.timeout`.
async fn write_batch<W: AsyncWrite + Unpin>(
    wr: &mut W,
    batch: &[Outgoing],
    limits: &SendLimits,
) -> Result<(), NetError> {
    // DRBD resets ko to ko-count for every send on the data socket; 0 never drops.
    let mut ko = limits.ko_count;
    // At most MAX_BATCH packets of two parts each, on the stack (no allocation per batch).
    // Empty parts (a `Link::sent` marker) are skipped: a write of nothing but empty
    // slices returns 0, which would read as a closed socket.
    assert!(
        batch.len() <= MAX_BATCH,
        "a batch is at most MAX_BATCH packets"
    );
    let mut store: [&[u8]; 2 * MAX_BATCH] = [&[]; 2 * MAX_BATCH];
    let mut count = 0;
    for item in batch {
        let data = item.data.as_ref().map(|d| d.as_slice());
        for part in std::iter::once(&item.bytes[..]).chain(data) {
            if !part.is_empty() {
                store[count] = part;
                count += 1;
            }
        }
    }
    let parts = &store[..count];
    let (mut idx, mut off) = (0usize, 0usize);
    while idx < parts.len() {
        let mut slices = [IoSlice::new(&[]); 2 * MAX_BATCH];
        for (i, (s, p)) in slices.iter_mut().zip(&parts[idx..]).enumerate() {
            *s = IoSlice::new(if i == 0 { &p[off..] } else { p });
        }
        let slices = &slices[..parts.len() - idx];
        // A write that has not started when the timeout fires has written nothing
        // (tokio's socket writes are cancel-safe), so it is simply retried.
        let mut n = match tokio::time::timeout(limits.timeout, wr.write_vectored(slices)).await {
            Ok(r) => r?,
            Err(_) if limits.meta => {
                tracing::warn!(
                    "meta socket send blocked for {:?} (`timeout`): the peer is not reading",
                    limits.timeout
                );
                return Err(NetError::Timeout("meta socket send blocked for `timeout`"));
            }
            Err(_) => {
                limits.live.request_ping();
                if ko > 0 {
                    ko -= 1;
                    if ko == 0 {
                        tracing::warn!(
                            "data socket send blocked for ko-count ({}) × timeout ({:?})",
                            limits.ko_count,
                            limits.timeout
                        );
                        return Err(NetError::Timeout(
                            "data socket send blocked for ko-count × timeout",
                        ));
                    }
                }
                tracing::warn!(
                    "data socket send blocked for {:?} (`timeout`), ko = {ko}; pinging the peer",
                    limits.timeout
                );
                continue;
            }
        };
        if n == 0 {
            return Err(NetError::Closed);
        }
        while idx < parts.len() && n > 0 {
            let left = parts[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Reads the next packet's header and fixed part.
async fn next_packet(
    rd: &mut Reader,
    ctx: &WireCtx,
    head: &mut Vec<u8>,
) -> Result<(Header, Packet, usize), NetError> {
    let mut hbuf = [0u8; 16];
    let hlen = ctx.header_len();
    read_exact(rd, &mut hbuf[..hlen]).await?;
    let hdr = Header::decode(&hbuf[..hlen], ctx)?;
    let layout = wire::payload_layout(&hdr, ctx)?;
    head.resize(layout.head, 0);
    read_exact(rd, head).await?;
    let pkt = wire::decode(&hdr, head, ctx)?;
    Ok((hdr, pkt, layout.data))
}

/// Queues a ping or ping ack on the meta stream; a full or closed queue ends the
/// connection.
fn send_meta(link: &Link, cmd: Command) -> Result<(), NetError> {
    link.send(Stream::Meta, &Packet::Empty(cmd), None)
        .map_err(|e| NetError::Protocol(format!("meta queue: {e}")))
}

/// Hands one decoded packet to the replica; its refusal ends the connection.
async fn deliver<R: Replica>(replica: &R, session: u64, ev: PeerEvent) -> Result<(), NetError> {
    replica
        .peer_event(session, ev)
        .await
        .map_err(NetError::Protocol)
}

/// `P_TRIM` / `P_ZEROES` as the write it asks for: zeroes unless the peer agreed
/// `DRBD_FF_WZEROES` and sent a plain discard.
fn trim_write(cmd: Command, dh: &wire::DataHeader, size: u32, ctx: &WireCtx) -> PeerEvent {
    let zero = cmd == Command::P_ZEROES || !ctx.has(wire::ff::DRBD_FF_WZEROES);
    let kind = if zero {
        PeerWriteKind::Zeroes {
            unmap: dh.dp_flags & dp::DP_DISCARD != 0 || cmd == Command::P_TRIM,
        }
    } else {
        PeerWriteKind::Discard
    };
    PeerEvent::Write(PeerWrite {
        block_id: dh.block_id,
        sector: dh.sector,
        len: size,
        dp_flags: dh.dp_flags,
        kind,
    })
}

/// A request or block description on the data socket: a read of this node
/// (`P_DATA_REQUEST`), a range the peer did not send (`P_OUT_OF_SYNC`, DRBD's Ahead
/// mode), or a resync / verify packet.
fn block_event(p: &Packet) -> Result<PeerEvent, NetError> {
    Ok(match *p {
        Packet::BlockReq { cmd, req, .. } if cmd == Command::P_DATA_REQUEST => {
            PeerEvent::ReadRequest {
                sector: req.sector,
                len: req.blksize,
                block_id: req.block_id,
            }
        }
        Packet::BlockDesc { cmd, desc } if cmd == Command::P_OUT_OF_SYNC => PeerEvent::OutOfSync {
            sector: desc.sector,
            len: desc.blksize,
        },
        _ => match Inbound::from_packet(p) {
            Ok(Some(inbound)) => PeerEvent::Resync(inbound),
            Ok(None) => {
                return Err(NetError::Protocol(format!(
                    "unexpected {} on the data socket",
                    p.command().name()
                )))
            }
            Err(e) => return Err(NetError::Protocol(e.to_string())),
        },
    })
}

/// The data socket: writes, trims, barriers, state.
async fn data_receiver<R: Replica>(
    mut rd: Reader,
    ctx: WireCtx,
    replica: Arc<R>,
    session: u64,
) -> Result<(), NetError> {
    let mut head = Vec::with_capacity(64);
    loop {
        let (hdr, pkt, data_len) = next_packet(&mut rd, &ctx, &mut head).await?;
        match pkt {
            Packet::Data {
                cmd,
                head: dh,
                data_len: len,
                ..
            } => {
                // P_DATA (a write), P_RS_DATA_REPLY (resync data), P_DATA_REPLY (a read
                // this node asked for): the data follows, read under the data budget.
                let size =
                    usize::try_from(len).map_err(|_| NetError::Protocol("data length".into()))?;
                if size == 0 || size != data_len {
                    return Err(NetError::Protocol(format!(
                        "{} with {size} data bytes",
                        cmd.name()
                    )));
                }
                let mut data = replica
                    .receive_buffer(size)
                    .await
                    .map_err(|e| NetError::Protocol(format!("{}: {e}", cmd.name())))?;
                read_exact(&mut rd, data.buf.as_mut_slice()).await?;
                let ev = match cmd {
                    Command::P_RS_DATA_REPLY => PeerEvent::ResyncData {
                        sector: dh.sector,
                        len,
                        data,
                    },
                    Command::P_DATA_REPLY => PeerEvent::ReadReply {
                        block_id: dh.block_id,
                        data,
                    },
                    _ => PeerEvent::Write(PeerWrite {
                        block_id: dh.block_id,
                        sector: dh.sector,
                        len,
                        dp_flags: dh.dp_flags,
                        kind: PeerWriteKind::Data(data),
                    }),
                };
                deliver(&*replica, session, ev).await?;
            }
            Packet::Trim {
                cmd,
                head: dh,
                size,
            } => deliver(&*replica, session, trim_write(cmd, &dh, size, &ctx)).await?,
            p @ (Packet::BlockReq { .. } | Packet::BlockDesc { .. }) => {
                deliver(&*replica, session, block_event(&p)?).await?;
            }
            Packet::Barrier(b) => {
                deliver(&*replica, session, PeerEvent::Barrier(b.barrier)).await?
            }
            Packet::State(word) => deliver(&*replica, session, PeerEvent::State(word)).await?,
            Packet::ReqState { cmd, req } => {
                deliver(&*replica, session, PeerEvent::StateRequest { cmd, req }).await?;
            }
            Packet::Empty(c) if c == Command::P_UNPLUG_REMOTE => {}
            Packet::Uuids(u) => deliver(&*replica, session, PeerEvent::Uuids(u.into())).await?,
            Packet::DelayProbe(_)
            | Packet::Sizes(_)
            | Packet::SyncParam { .. }
            | Packet::Protocol {
                cmd: Command::P_PROTOCOL_UPDATE,
                ..
            } => {}
            _ => {
                return Err(NetError::Protocol(format!(
                    "unexpected {} on the data socket",
                    hdr.command.name()
                )))
            }
        }
    }
}

/// The meta socket: acks, barrier acks, pings.
async fn meta_receiver<R: Replica>(
    mut rd: Reader,
    ctx: WireCtx,
    replica: Arc<R>,
    link: Link,
    live: Arc<Live>,
    session: u64,
) -> Result<(), NetError> {
    let mut head = Vec::with_capacity(32);
    loop {
        let (hdr, pkt, _) = next_packet(&mut rd, &ctx, &mut head).await?;
        live.received();
        match pkt {
            Packet::Empty(c) if c == Command::P_PING => {
                send_meta(&link, Command::P_PING_ACK)?;
            }
            Packet::Empty(c) if c == Command::P_PING_ACK => {
                live.ping_acks.fetch_add(1, Ordering::Relaxed);
            }
            p @ Packet::BlockAck { .. } => match Inbound::from_packet(&p) {
                Ok(Some(inbound)) => {
                    deliver(&*replica, session, PeerEvent::Resync(inbound)).await?;
                }
                Ok(None) => {
                    if let Packet::BlockAck { cmd, ack } = p {
                        deliver(&*replica, session, PeerEvent::Ack { cmd, ack }).await?;
                    }
                }
                Err(e) => return Err(NetError::Protocol(e.to_string())),
            },
            Packet::BarrierAck(b) => {
                let ev = PeerEvent::BarrierAck {
                    barrier: b.barrier,
                    set_size: b.set_size,
                };
                deliver(&*replica, session, ev).await?;
            }
            Packet::ReqStateReply { retcode, .. } => {
                deliver(&*replica, session, PeerEvent::StateReply(retcode)).await?;
            }
            Packet::DelayProbe(_) => {}
            _ => {
                return Err(NetError::Protocol(format!(
                    "unexpected {} on the meta socket",
                    hdr.command.name()
                )))
            }
        }
    }
}

/// Runs [`Liveness`] on the connection: pings when it says so, drops the connection
/// when it declares the peer dead.
async fn watchdog<R: Replica>(
    link: Link,
    live: Arc<Live>,
    replica: Arc<R>,
    cfg: LivenessConfig,
) -> Result<(), NetError> {
    let mut l = Liveness::new(cfg);
    loop {
        // Idle before looking: a write queued after this is either seen by the look or
        // wakes the sleep that follows it (`Watch`).
        live.watch.set_idle(true);
        let o = Observation {
            now: Instant::now(),
            last_rx: live.last_rx(),
            ping_acks: live.ping_acks.load(Ordering::Relaxed),
            oldest_wait: replica.oldest_peer_wait(),
            ping_requested: live.ping_wanted.swap(false, Ordering::Relaxed),
        };
        if o.oldest_wait.is_some() {
            live.watch.set_idle(false);
        }
        let wait = match l.step(&o) {
            Step::Wait(d) => d,
            Step::Ping(reason, d) => {
                tracing::debug!("P_PING: {}", reason.describe());
                send_meta(&link, Command::P_PING)?;
                d
            }
            Step::Dead(Dead::NoPingAck { reason }) => {
                tracing::warn!(
                    "the peer did not answer a P_PING within ping-timeout ({:?}; pinged because \
                     {}): declaring it dead",
                    cfg.ping_timeout,
                    reason.describe()
                );
                return Err(NetError::Timeout("no P_PING_ACK within ping-timeout"));
            }
            Step::Dead(Dead::KoCount { waited }) => {
                tracing::warn!(
                    "the peer left a write unanswered for {waited:?} > ko-count ({}) × timeout \
                     ({:?}): dropping it",
                    cfg.ko_count,
                    cfg.timeout
                );
                return Err(NetError::Timeout(
                    "a write unanswered for ko-count × timeout",
                ));
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = live.watch.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This side sends its last packet and ends the connection while the peer is still
    /// sending (its `P_DATA` stream); `graceful` is [`linger`]. What the peer sees: its
    /// next 4 MiB of writes, then its read of the last packet and of the end.
    async fn peer_after_the_end(graceful: bool) -> std::io::Result<(Vec<u8>, usize)> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut peer = TcpStream::connect(l.local_addr()?).await?;
        let (mut mine, _) = l.accept().await?;
        peer.write_all(&[1u8; 64 << 10]).await?;
        mine.write_all(b"last").await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let kept = [graceful.then(|| keep(&mine)).flatten(), None];
        drop(mine);
        tokio::spawn(linger(kept));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let bounded = |e| std::io::Error::other(format!("{e}"));
        // A peer's connection ends at its first failed write, before it reads more.
        tokio::time::timeout(Duration::from_secs(5), peer.write_all(&vec![2u8; 4 << 20]))
            .await
            .map_err(bounded)??;
        let mut last = vec![0u8; 4];
        peer.read_exact(&mut last).await?;
        let after = peer.read(&mut [0u8; 16]).await?;
        Ok((last, after))
    }

    /// Closing a socket with the peer's data unread resets the connection: the peer's
    /// next write fails and it ends its connection without reading this side's last
    /// packet (seen: a lost `P_STATE`). The graceful end keeps reading until the peer is
    /// done: it reads the last packet, then the end.
    #[tokio::test]
    async fn an_ended_connection_lets_the_peer_read_its_last_packet() {
        let abrupt = peer_after_the_end(false).await;
        assert!(
            abrupt.is_err(),
            "the peer's writes went on after a reset: {abrupt:?}"
        );
        let (last, after) = peer_after_the_end(true).await.expect("the graceful end");
        assert_eq!((&last[..], after), (&b"last"[..], 0));
    }

    /// A peer that stops reading: the data sender asks for a ping at every `timeout` and
    /// gives up after `ko-count` of them; the meta sender gives up at the first.
    #[tokio::test]
    async fn a_blocked_send_pings_then_gives_up_after_ko_count() {
        let batch = vec![Outgoing::bytes(&[7; 4096])];
        for (meta, ko, want_expiries) in [(false, 3u32, 3u32), (true, 3, 1)] {
            // Nobody reads `_b`: after 64 bytes every write blocks.
            let (mut a, _b) = tokio::io::duplex(64);
            let live = Arc::new(Live::new(Arc::default()));
            let limits = SendLimits {
                timeout: Duration::from_millis(50),
                ko_count: ko,
                meta,
                live: live.clone(),
            };
            let t = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                write_batch(&mut a, &batch, &limits),
            )
            .await
            .expect("bounded");
            assert!(matches!(r, Err(NetError::Timeout(_))), "{r:?}");
            assert!(t.elapsed() >= Duration::from_millis(50) * want_expiries);
            assert_eq!(live.ping_wanted.load(Ordering::Relaxed), !meta);
        }
    }

    #[tokio::test]
    async fn vectored_batches_survive_short_writes() {
        // A duplex pipe with a tiny buffer forces many partial writes.
        let (mut a, mut b) = tokio::io::duplex(7);
        let data = Arc::new(crate::store::AlignedBuf::from_slice(&[9u8; 1024]).expect("buf"));
        let batch = vec![
            Outgoing {
                data: Some(data.clone()),
                ..Outgoing::bytes(&[1, 2, 3])
            },
            Outgoing::bytes(&[4; 100]),
            // A `Link::sent` marker, in the middle and last: nothing to write.
            Outgoing::bytes(&[]),
            Outgoing {
                data: Some(data),
                sent_id: Some(3),
                ..Outgoing::bytes(&[5])
            },
            Outgoing::bytes(&[]),
        ];
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got).await;
            got
        });
        let limits = SendLimits {
            timeout: Duration::from_secs(5),
            ko_count: 7,
            meta: false,
            live: Arc::new(Live::new(Arc::default())),
        };
        write_batch(&mut a, &batch, &limits).await.expect("write");
        drop(a);
        let got = reader.await.expect("join");
        let mut want = vec![1, 2, 3];
        want.extend_from_slice(&[9u8; 1024]);
        want.extend_from_slice(&[4; 100]);
        want.push(5);
        want.extend_from_slice(&[9u8; 1024]);
        assert_eq!(got, want);
    }

    /// A target takes a `P_OUT_OF_SYNC` before `P_SYNC_UUID` as whole blocks; a range
    /// that is empty, not whole sectors, over 1 MiB or past the volume is refused.
    #[test]
    fn told_ranges_are_marked_or_refused() {
        let desc = |sector, blksize| wire::BlockDesc {
            sector,
            blksize,
            pad: 0,
        };
        // 130 blocks: three words.
        let mut told = OutOfSync::new(130 * 8);
        for (sector, len) in [(4, 4096), (8 * 63, 2 * 4096), (8 * 129 + 7, 512)] {
            mark_told(&mut told, &desc(sector, len)).expect("a range of the volume");
        }
        assert_eq!(told.words(), vec![0b11 | 1 << 63, 1, 1 << 1]);
        for (sector, len) in [
            (0, 0),
            (0, 100),
            (0, wire::DRBD_MAX_BIO_SIZE + 4096),
            (8 * 130, 512),
            (8 * 129 + 7, 1024),
            (u64::MAX - 1, 4096),
        ] {
            let e = mark_told(&mut told, &desc(sector, len)).expect_err("refused");
            assert!(e.to_string().contains("not a range of this volume"), "{e}");
        }
        assert_eq!(
            told.words(),
            vec![0b11 | 1 << 63, 1, 1 << 1],
            "refused ranges mark nothing"
        );
    }
}
