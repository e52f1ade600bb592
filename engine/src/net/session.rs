//! A live connection: the handshake, then four tasks (data/meta × send/receive) until
//! one fails.

use super::handshake::{self, PeerParams};
use super::{read_exact, Link, NetError, Outgoing};
use crate::config::{Config, NodeConfig};
use crate::resync::{Inbound, SLEEP_TIME_MS};
use crate::state::uuid::HandshakeOutcome;
use crate::volume::{PeerWrite, PeerWriteKind, Volume};
use crate::wire::{self, dp, BitmapReceiver, BitmapSender, Command, Header, Packet, WireCtx};
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader};
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
pub async fn run(
    volume: Arc<Volume>,
    config: &Config,
    peer: &NodeConfig,
    sockets: (TcpStream, TcpStream),
    resolve_conflicts: bool,
    session: u64,
    established: &mut bool,
) -> Result<(), NetError> {
    let (mut data, meta) = sockets;
    let local = volume.handshake_params(resolve_conflicts);
    let params: PeerParams =
        tokio::time::timeout(super::HANDSHAKE_TIMEOUT, handshake::run(&mut data, local))
            .await
            .map_err(|_| NetError::Timeout("handshake"))??;
    let ctx = params.ctx;
    if let Some(why) = &params.split_brain_resolved {
        tracing::warn!("{why}");
        volume.split_brain_resolved(why.clone());
    }
    // An old run's resync write must not land after this connection's writes.
    volume.wait_sync_io_idle().await;
    if let HandshakeOutcome::SyncSource { full } | HandshakeOutcome::SyncTarget { full } =
        params.sync
    {
        let source = matches!(params.sync, HandshakeOutcome::SyncSource { .. });
        tokio::time::timeout(
            EXCHANGE_TIMEOUT,
            exchange(&mut data, &volume, &ctx, source, full, volume.use_rle()),
        )
        .await
        .map_err(|_| NetError::Timeout("bitmap exchange"))??;
    }
    // Sends in a queue: at most every un-acked write (2 × max-buffers) plus one barrier
    // per epoch among them, so 4 × max-buffers (+ pings, state) never fills it.
    let queue = config.net.max_buffers as usize * 4 + 64;
    let (data_tx, data_rx) = mpsc::channel(queue);
    let (meta_tx, meta_rx) = mpsc::channel(queue);
    let link = Link {
        ctx,
        data: data_tx,
        meta: meta_tx.clone(),
        session,
    };
    tracing::info!(
        "connected to {} ({}): role {}, disk {}, protocol {}, agreed version {}, sync decision {:?}",
        peer.name,
        peer.address,
        params.role,
        params.disk,
        config.resource.protocol,
        ctx.version(),
        params.sync
    );
    *established = true;
    volume.set_connection_error(None);
    let kill = volume.connection_up(link, &params);

    let (data_rd, data_wr) = data.into_split();
    let (meta_rd, meta_wr) = meta.into_split();
    let last_meta_rx = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks: JoinSet<Result<(), NetError>> = JoinSet::new();
    tasks.spawn(sender(data_wr, data_rx, volume.clone(), session));
    tasks.spawn(sender(meta_wr, meta_rx, volume.clone(), session));
    tasks.spawn(data_receiver(
        BufReader::with_capacity(READ_BUFFER, data_rd),
        ctx,
        volume.clone(),
        meta_tx.clone(),
        session,
    ));
    tasks.spawn(meta_receiver(
        BufReader::with_capacity(READ_BUFFER, meta_rd),
        ctx,
        volume.clone(),
        meta_tx.clone(),
        last_meta_rx.clone(),
        started,
        session,
    ));
    tasks.spawn(pinger(
        ctx,
        meta_tx,
        last_meta_rx,
        started,
        config.net.ping_interval,
        config.net.ping_timeout,
    ));
    tasks.spawn(ticker(volume.clone(), session));
    // The volume asks for the connection to go (disconnect, a failed flush, a full queue).
    tasks.spawn(async move {
        kill.notified().await;
        Err(NetError::Shutdown)
    });
    let first = tasks.join_next().await;
    tasks.abort_all();
    match first {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(NetError::Protocol(format!("connection task failed: {e}"))),
        None => Ok(()),
    }
}

/// Time the bitmap exchange and the sync UUID may take (a 1 TiB volume's uncompressed
/// bitmap is 32 MiB).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// The bitmap exchange and the sync UUID (see `volume::sync`): WFBitMapS sends first,
/// WFBitMapT receives first; both OR-merge; then the source sends `P_SYNC_UUID`.
async fn exchange(
    data: &mut TcpStream,
    volume: &Volume,
    ctx: &WireCtx,
    source: bool,
    full: bool,
    use_rle: bool,
) -> Result<(), NetError> {
    let (words, bm_bits) = volume.exchange_snapshot(full);
    let mut peer = vec![0u64; words.len()];
    if source {
        send_bitmap(data, &words, bm_bits, ctx, use_rle).await?;
        receive_bitmap(data, &mut peer, bm_bits, ctx).await?;
    } else {
        receive_bitmap(data, &mut peer, bm_bits, ctx).await?;
        send_bitmap(data, &words, bm_bits, ctx, use_rle).await?;
    }
    let added = volume.merge_peer_bitmap(&peer);
    tracing::info!("bitmap exchange: the peer's bitmap added {added} out-of-sync blocks");
    if source {
        let uuid = volume.begin_sync_source().map_err(NetError::Protocol)?;
        super::send_packet(data, &Packet::SyncUuid(uuid), ctx).await
    } else {
        let uuid = loop {
            match super::read_control(data, ctx).await? {
                (_, Packet::SyncUuid(u)) => break u,
                (_, Packet::State(_)) => {}
                (hdr, _) => {
                    return Err(NetError::Protocol(format!(
                        "expected P_SYNC_UUID, got {}",
                        hdr.command.name()
                    )))
                }
            }
        };
        volume
            .begin_sync_target(uuid)
            .await
            .map_err(NetError::Protocol)
    }
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

async fn receive_bitmap(
    data: &mut TcpStream,
    peer: &mut [u64],
    bm_bits: u64,
    ctx: &WireCtx,
) -> Result<(), NetError> {
    let mut rx = BitmapReceiver::new(bm_bits, ctx)
        .map_err(|e| NetError::Protocol(format!("bitmap: {e}")))?;
    loop {
        let (hdr, pkt) = super::read_control(data, ctx).await?;
        match pkt {
            Packet::State(_) => {}
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

/// The resync controller's clock: a step every 100 ms.
async fn ticker(volume: Arc<Volume>, session: u64) -> Result<(), NetError> {
    let mut iv = tokio::time::interval(Duration::from_millis(SLEEP_TIME_MS));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        volume.sync_tick(session);
    }
}

/// Writes queued packets, batching up to [`MAX_BATCH`] per `writev`.
async fn sender(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outgoing>,
    volume: Arc<Volume>,
    session: u64,
) -> Result<(), NetError> {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH);
    loop {
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return Err(NetError::Shutdown);
        }
        write_batch(&mut wr, &batch).await?;
        let bytes: usize = batch
            .iter()
            .map(|i| i.bytes.len() + i.data.as_ref().map_or(0, |d| d.len()))
            .sum();
        volume.count_tx(bytes as u64);
        for item in batch.drain(..) {
            if let Some(id) = item.sent_id {
                volume.handed_to_network(session, id);
            }
        }
    }
}

/// Writes every packet of `batch` (header + optional data) with vectored writes.
async fn write_batch<W: AsyncWrite + Unpin>(
    wr: &mut W,
    batch: &[Outgoing],
) -> Result<(), NetError> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
    for item in batch {
        parts.push(&item.bytes);
        if let Some(d) = &item.data {
            parts.push(d.as_slice());
        }
    }
    let (mut idx, mut off) = (0usize, 0usize);
    while idx < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[idx..]
            .iter()
            .enumerate()
            .map(|(i, p)| IoSlice::new(if i == 0 { &p[off..] } else { p }))
            .take(1024)
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
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

fn encode_to(pkt: &Packet, ctx: &WireCtx) -> Result<Outgoing, NetError> {
    let mut bytes = Vec::with_capacity(48);
    wire::encode(pkt, ctx, 0, &mut bytes)?;
    Ok(Outgoing {
        bytes,
        data: None,
        sent_id: None,
    })
}

/// The data socket: writes, trims, barriers, state.
async fn data_receiver(
    mut rd: Reader,
    ctx: WireCtx,
    volume: Arc<Volume>,
    meta: mpsc::Sender<Outgoing>,
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
                let mut data = volume
                    .receive_buffer(size)
                    .await
                    .map_err(|e| NetError::Protocol(format!("{}: {e}", cmd.name())))?;
                read_exact(&mut rd, data.buf.as_mut_slice()).await?;
                match cmd {
                    Command::P_RS_DATA_REPLY => volume.rs_data_reply(session, dh.sector, len, data),
                    Command::P_DATA_REPLY => volume.data_reply(session, dh.block_id, data),
                    _ => {
                        let w = PeerWrite {
                            block_id: dh.block_id,
                            sector: dh.sector,
                            len,
                            dp_flags: dh.dp_flags,
                            kind: PeerWriteKind::Data(data),
                        };
                        volume.peer_write(session, w).await
                    }
                }
                .map_err(NetError::Protocol)?;
            }
            Packet::Trim {
                cmd,
                head: dh,
                size,
            } => {
                let zero = cmd == Command::P_ZEROES || !ctx.has(wire::ff::DRBD_FF_WZEROES);
                let kind = if zero {
                    PeerWriteKind::Zeroes {
                        unmap: dh.dp_flags & dp::DP_DISCARD != 0 || cmd == Command::P_TRIM,
                    }
                } else {
                    PeerWriteKind::Discard
                };
                let w = PeerWrite {
                    block_id: dh.block_id,
                    sector: dh.sector,
                    len: size,
                    dp_flags: dh.dp_flags,
                    kind,
                };
                volume
                    .peer_write(session, w)
                    .await
                    .map_err(NetError::Protocol)?;
            }
            Packet::BlockReq { cmd, req, .. } if cmd == Command::P_DATA_REQUEST => volume
                .peer_read_request(session, req.sector, req.blksize, req.block_id)
                .await
                .map_err(NetError::Protocol)?,
            p @ (Packet::BlockReq { .. } | Packet::BlockDesc { .. }) => {
                match Inbound::from_packet(&p) {
                    Ok(Some(inbound)) => volume
                        .sync_inbound(session, inbound)
                        .await
                        .map_err(NetError::Protocol)?,
                    Ok(None) => {
                        return Err(NetError::Protocol(format!(
                            "unexpected {} on the data socket",
                            hdr.command.name()
                        )))
                    }
                    Err(e) => return Err(NetError::Protocol(e.to_string())),
                }
            }
            Packet::Barrier(b) => volume
                .peer_barrier(session, b.barrier)
                .await
                .map_err(NetError::Protocol)?,
            Packet::State(word) => volume.peer_state(session, word),
            Packet::ReqState { cmd, .. } => {
                // A graceful state change request (e.g. the peer disconnecting): agree.
                let reply_cmd = if cmd == Command::P_CONN_ST_CHG_REQ {
                    Command::P_CONN_ST_CHG_REPLY
                } else {
                    Command::P_STATE_CHG_REPLY
                };
                let out = encode_to(
                    &Packet::ReqStateReply {
                        cmd: reply_cmd,
                        retcode: 1,
                    },
                    &ctx,
                )?;
                meta.try_send(out)
                    .map_err(|_| NetError::Protocol("meta queue full".into()))?;
            }
            Packet::Empty(c) if c == Command::P_UNPLUG_REMOTE => {}
            Packet::Uuids(u) => volume.peer_uuids(session, u.into()),
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
async fn meta_receiver(
    mut rd: Reader,
    ctx: WireCtx,
    volume: Arc<Volume>,
    meta: mpsc::Sender<Outgoing>,
    last_rx: Arc<AtomicU64>,
    started: Instant,
    session: u64,
) -> Result<(), NetError> {
    let mut head = Vec::with_capacity(32);
    loop {
        let (hdr, pkt, _) = next_packet(&mut rd, &ctx, &mut head).await?;
        last_rx.store(elapsed_ms(started), Ordering::Relaxed);
        match pkt {
            Packet::Empty(c) if c == Command::P_PING => {
                let out = encode_to(&Packet::Empty(Command::P_PING_ACK), &ctx)?;
                meta.try_send(out)
                    .map_err(|_| NetError::Protocol("meta queue full".into()))?;
            }
            Packet::Empty(c) if c == Command::P_PING_ACK => {}
            p @ Packet::BlockAck { .. } => match Inbound::from_packet(&p) {
                Ok(Some(inbound)) => volume
                    .sync_inbound(session, inbound)
                    .await
                    .map_err(NetError::Protocol)?,
                Ok(None) => {
                    if let Packet::BlockAck { cmd, ack } = p {
                        volume
                            .peer_ack(session, cmd, ack)
                            .map_err(NetError::Protocol)?;
                    }
                }
                Err(e) => return Err(NetError::Protocol(e.to_string())),
            },
            Packet::BarrierAck(b) => volume
                .barrier_ack(session, b.barrier, b.set_size)
                .map_err(NetError::Protocol)?,
            Packet::ReqStateReply { .. } | Packet::DelayProbe(_) => {}
            _ => {
                return Err(NetError::Protocol(format!(
                    "unexpected {} on the meta socket",
                    hdr.command.name()
                )))
            }
        }
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Pings after `interval` of meta silence; fails if nothing arrives within `timeout`.
async fn pinger(
    ctx: WireCtx,
    meta: mpsc::Sender<Outgoing>,
    last_rx: Arc<AtomicU64>,
    started: Instant,
    interval: Duration,
    timeout: Duration,
) -> Result<(), NetError> {
    loop {
        let last = Duration::from_millis(last_rx.load(Ordering::Relaxed));
        let idle = started.elapsed().saturating_sub(last);
        if idle < interval {
            tokio::time::sleep(interval - idle).await;
            continue;
        }
        let sent_at = elapsed_ms(started);
        meta.try_send(encode_to(&Packet::Empty(Command::P_PING), &ctx)?)
            .map_err(|_| NetError::Protocol("meta queue full".into()))?;
        tokio::time::sleep(timeout).await;
        if last_rx.load(Ordering::Relaxed) < sent_at {
            return Err(NetError::Timeout("no P_PING_ACK within ping-timeout"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn vectored_batches_survive_short_writes() {
        // A duplex pipe with a tiny buffer forces many partial writes.
        let (mut a, mut b) = tokio::io::duplex(7);
        let data = Arc::new(crate::store::AlignedBuf::from_slice(&[9u8; 1024]).expect("buf"));
        let batch = vec![
            Outgoing {
                bytes: vec![1, 2, 3],
                data: Some(data.clone()),
                sent_id: None,
            },
            Outgoing {
                bytes: vec![4; 100],
                data: None,
                sent_id: None,
            },
            Outgoing {
                bytes: vec![5],
                data: Some(data),
                sent_id: Some(3),
            },
        ];
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got).await;
            got
        });
        write_batch(&mut a, &batch).await.expect("write");
        drop(a);
        let got = reader.await.expect("join");
        let mut want = vec![1, 2, 3];
        want.extend_from_slice(&[9u8; 1024]);
        want.extend_from_slice(&[4; 100]);
        want.push(5);
        want.extend_from_slice(&[9u8; 1024]);
        assert_eq!(got, want);
    }
}
