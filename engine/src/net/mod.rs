//! The replication connection: sockets, DRBD 8.4's connection dance, and the data/meta
//! loops.
//!
//! A connection is two TCP sockets, as in DRBD 8.4: the **data** socket carries writes,
//! barriers and state; the **meta** socket carries acks and pings (so an ack never queues
//! behind megabytes of data). Who connects: both nodes listen on their `address`; the node
//! whose address sorts higher connects (first socket `P_INITIAL_DATA`, second
//! `P_INITIAL_META`, h80); both accept and classify sockets by that first packet, and a
//! complete pair the peer opened is taken whenever it arrives — a kernel DRBD 8.4 peer
//! connects from either side.
//!
//! Then, on the data socket: `P_CONNECTION_FEATURES` both ways (h80; agreed version =
//! min of the maxima, h100 headers after it), `P_PROTOCOL`, `P_SYNC_PARAM89`, `P_SIZES`,
//! `P_UUIDS`, `P_STATE` — sent by both sides, no request/response — and the checks DRBD
//! makes on them (same wire protocol, peer large enough, at most one Primary). After that
//! four tasks run until any of them fails: data sender, data receiver, meta sender, meta
//! receiver (which also pings). Any failure drops the whole connection, the volume is told
//! (its core marks every write not yet barrier-acked out of sync), and the manager
//! reconnects with exponential back-off (100 ms doubling up to `connect-int`).
//!
//! Bounds: the first packet of an accepted socket must arrive within
//! [`FIRST_PACKET_TIMEOUT`], and at most [`MAX_UNCLASSIFIED_SOCKETS`] wait for it; the
//! handshake must complete within [`HANDSHAKE_TIMEOUT`];
//! at most [`MAX_PENDING_SOCKETS`] accepted sockets wait for the manager; the send queues
//! hold at most `max-buffers` × 4 + 64 packets (more than the core can have in flight,
//! so a full queue is a bug and drops the connection); a packet is at most 1 MiB of data
//! plus its sub-header (the codec refuses larger lengths before anything is read).
//! Liveness: the meta socket pings after `ping-int` of silence and gives up after
//! `ping-timeout` without an answer, DRBD's defaults 10 s and 0.5 s.

pub mod handshake;
pub mod liveness;
mod session;
pub mod socket;

use crate::config::{Config, NodeConfig};
use crate::state::ConnState;
use crate::store::AlignedBuf;
use crate::volume::Volume;
use crate::wire::{self, Command, Header, WireCtx};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Time an accepted socket has to send its first packet.
pub const FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(3);
/// Time the whole handshake (features … state) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted, classified sockets waiting for the connection manager.
pub const MAX_PENDING_SOCKETS: usize = 4;
/// Accepted sockets whose first packet is still awaited; more are closed at once.
pub const MAX_UNCLASSIFIED_SOCKETS: usize = 16;
/// Time a `connect()` to the peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// First reconnect delay; doubles up to `connect-int`.
pub const BACKOFF_START: Duration = Duration::from_millis(100);

/// A packet queued for a socket's sender task: encoded header (+ sub-header), optional
/// data that follows it, and the request to report as handed to the network (protocol A).
#[derive(Debug)]
pub struct Outgoing {
    /// Header and fixed payload.
    pub bytes: Vec<u8>,
    /// Data bytes following the header (P_DATA), shared with the local write.
    pub data: Option<Arc<AlignedBuf>>,
    /// Request id to report once the packet is in the socket (protocol A completion).
    pub sent_id: Option<u64>,
}

/// The sending side of a live connection, handed to the volume driver.
#[derive(Debug, Clone)]
pub struct Link {
    /// Agreed protocol version and features.
    pub ctx: WireCtx,
    /// Data socket queue.
    pub data: mpsc::Sender<Outgoing>,
    /// Meta socket queue.
    pub meta: mpsc::Sender<Outgoing>,
    /// Connection number, so a late event of an old connection is ignored.
    pub session: u64,
}

/// Why a connection ended or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A socket error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer sent bytes that are not a valid DRBD packet, or an unexpected one.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The codec refused a packet.
    #[error("malformed packet: {0}")]
    Wire(#[from] wire::WireError),
    /// The peer is incompatible (protocol, size, roles).
    #[error("refused peer: {0}")]
    Refused(String),
    /// The generation UUIDs say the two disks diverged (split brain) or share no
    /// history: the connection is dropped and the node stays StandAlone.
    #[error("split brain: {0}")]
    SplitBrain(String),
    /// A deadline passed.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// Shutting down.
    #[error("shutting down")]
    Shutdown,
}

/// Writes one packet built by `f` (no data) to a socket.
async fn send_packet(
    stream: &mut TcpStream,
    pkt: &wire::Packet,
    ctx: &WireCtx,
) -> Result<(), NetError> {
    let mut out = Vec::with_capacity(96);
    wire::encode(pkt, ctx, 0, &mut out)?;
    stream.write_all(&out).await?;
    Ok(())
}

/// Reads one whole control packet (no data part) from a socket.
async fn read_control<R: AsyncReadExt + Unpin>(
    rd: &mut R,
    ctx: &WireCtx,
) -> Result<(Header, wire::Packet), NetError> {
    let mut hbuf = [0u8; 16];
    let hlen = ctx.header_len();
    read_exact(rd, &mut hbuf[..hlen]).await?;
    let hdr = Header::decode(&hbuf[..hlen], ctx)?;
    let layout = wire::payload_layout(&hdr, ctx)?;
    if layout.data != 0 {
        return Err(NetError::Protocol(format!(
            "unexpected {} during the handshake",
            hdr.command.name()
        )));
    }
    let mut head = vec![0u8; layout.head];
    read_exact(rd, &mut head).await?;
    let pkt = wire::decode(&hdr, &head, ctx)?;
    Ok((hdr, pkt))
}

async fn read_exact<R: AsyncReadExt + Unpin>(rd: &mut R, buf: &mut [u8]) -> Result<(), NetError> {
    match rd.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(NetError::Closed),
        Err(e) => Err(NetError::Io(e)),
    }
}

/// True if this node makes the outgoing connections (its address sorts higher).
pub fn is_active(me: SocketAddr, peer: SocketAddr) -> bool {
    me > peer
}

/// Runs the connection manager until `shutdown`: listen, connect or accept, handshake,
/// serve, and reconnect with back-off after any failure.
pub async fn run(
    volume: Arc<Volume>,
    config: Config,
    me: NodeConfig,
    peer: NodeConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = loop {
        match bind(me.address) {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(
                    "cannot listen for the peer on {}: {e}; retrying",
                    me.address
                );
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        }
    };
    let (incoming_tx, mut incoming) = mpsc::channel(MAX_PENDING_SOCKETS);
    let acceptor = tokio::spawn(accept_loop(listener, incoming_tx, volume.clone()));
    let active = is_active(me.address, peer.address);
    let mut backoff = BACKOFF_START;
    let mut session_no = 0u64;
    let mut accepted = Accepted::default();
    while !*shutdown.borrow() {
        if volume.is_standalone() {
            volume.set_conn_state(ConnState::StandAlone);
            tokio::select! {
                _ = volume.wait_connect_allowed() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            continue;
        }
        volume.set_conn_state(ConnState::WFConnection);
        let sockets = tokio::select! {
            s = establish(active, peer.address, &mut incoming, &mut accepted, &config) => s,
            _ = shutdown.wait_for(|s| *s) => break,
            _ = volume.wait_standalone() => continue,
        };
        let (data, meta, resolve_conflicts) = match sockets {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!("no connection to {} yet: {e}", peer.name);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    // The peer connecting to us ends the wait at once.
                    Some((cmd, s)) = incoming.recv() => accepted.put(cmd, s),
                    _ = shutdown.wait_for(|s| *s) => break,
                }
                backoff = (backoff * 2).min(config.net.connect_interval);
                continue;
            }
        };
        session_no += 1;
        volume.set_conn_state(ConnState::WFReportParams);
        let result = tokio::select! {
            r = session::run(volume.clone(), &config, &peer, (data, meta), resolve_conflicts, session_no) => r,
            _ = shutdown.wait_for(|s| *s) => Err(NetError::Shutdown),
        };
        volume.connection_lost(session_no);
        match result {
            Ok(()) | Err(NetError::Shutdown) => {}
            Err(NetError::Closed) => {
                tracing::warn!("connection to {} lost: peer closed it", peer.name)
            }
            Err(NetError::SplitBrain(why)) => {
                // DRBD: "Split-Brain detected, dropping connection!" and StandAlone;
                // nothing is overwritten until an operator decides.
                tracing::error!(
                    "split brain with {}: {why}; staying StandAlone (resolve it, then `tandem connect`)",
                    peer.name
                );
                volume.split_brain(why);
            }
            Err(e) => tracing::warn!("connection to {} dropped: {e}", peer.name),
        }
        if *shutdown.borrow() {
            break;
        }
        backoff = BACKOFF_START;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    acceptor.abort();
    volume.set_conn_state(ConnState::StandAlone);
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(16)?;
    TcpListener::from_std(sock.into())
}

/// Accepts sockets forever; each must send `P_INITIAL_DATA` or `P_INITIAL_META` first.
async fn accept_loop(
    listener: TcpListener,
    tx: mpsc::Sender<(Command, TcpStream)>,
    volume: Arc<Volume>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_UNCLASSIFIED_SOCKETS));
    loop {
        let (mut stream, from) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("replication accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!("refused replication socket from {from}: {MAX_UNCLASSIFIED_SOCKETS} sockets already awaiting their first packet");
            continue;
        };
        let tx = tx.clone();
        let volume = volume.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let first = tokio::time::timeout(
                FIRST_PACKET_TIMEOUT,
                read_control(&mut stream, &WireCtx::pre_features()),
            )
            .await;
            let cmd = match first {
                Err(_) => {
                    tracing::warn!("refused replication socket from {from}: no first packet within {FIRST_PACKET_TIMEOUT:?}");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!("refused replication socket from {from}: {e}");
                    return;
                }
                Ok(Ok((_, wire::Packet::Empty(cmd))))
                    if cmd == Command::P_INITIAL_DATA || cmd == Command::P_INITIAL_META =>
                {
                    cmd
                }
                Ok(Ok((hdr, _))) => {
                    tracing::warn!(
                        "refused replication socket from {from}: protocol error, first packet is {} (expected P_INITIAL_DATA or P_INITIAL_META)",
                        hdr.command.name()
                    );
                    return;
                }
            };
            if volume.conn_state() >= ConnState::WFReportParams {
                tracing::warn!("refused replication socket from {from}: already connected");
                return;
            }
            if tx.try_send((cmd, stream)).is_err() {
                tracing::warn!("refused replication socket from {from}: too many pending sockets");
            }
        });
    }
}

/// Accepted sockets, sorted by their first packet, waiting to form a pair.
#[derive(Debug, Default)]
struct Accepted {
    data: Option<TcpStream>,
    meta: Option<TcpStream>,
}

impl Accepted {
    /// Files one accepted socket; a role arriving twice replaces the older socket (DRBD:
    /// "initial packet crossed").
    fn put(&mut self, cmd: Command, s: TcpStream) {
        if cmd == Command::P_INITIAL_DATA {
            self.data = Some(s);
        } else {
            self.meta = Some(s);
        }
    }

    fn take_pair(&mut self) -> Option<(TcpStream, TcpStream)> {
        match (self.data.take(), self.meta.take()) {
            (Some(d), Some(m)) => Some((d, m)),
            (d, m) => {
                self.data = d;
                self.meta = m;
                None
            }
        }
    }
}

/// Makes the data and meta sockets. Both sides accept: a pair the peer opened is used
/// whenever it is complete (a kernel DRBD peer connects from either side). The active
/// side also connects; the passive side waits up to `connect-int` for the peer. The bool
/// says whether this node accepted the meta socket (it then holds `RESOLVE_CONFLICTS`).
async fn establish(
    active: bool,
    peer: SocketAddr,
    incoming: &mut mpsc::Receiver<(Command, TcpStream)>,
    accepted: &mut Accepted,
    config: &Config,
) -> Result<(TcpStream, TcpStream, bool), NetError> {
    while let Ok((cmd, s)) = incoming.try_recv() {
        accepted.put(cmd, s);
    }
    let (data, meta, accepted_meta) = if let Some((d, m)) = accepted.take_pair() {
        (d, m, true)
    } else if active {
        let pre = WireCtx::pre_features();
        let mut data = connect(peer).await?;
        send_packet(
            &mut data,
            &wire::Packet::Empty(Command::P_INITIAL_DATA),
            &pre,
        )
        .await?;
        let mut meta = connect(peer).await?;
        send_packet(
            &mut meta,
            &wire::Packet::Empty(Command::P_INITIAL_META),
            &pre,
        )
        .await?;
        (data, meta, false)
    } else {
        let deadline =
            tokio::time::Instant::now() + config.net.connect_interval.max(Duration::from_secs(1));
        loop {
            let (cmd, s) = tokio::time::timeout_at(deadline, incoming.recv())
                .await
                .map_err(|_| NetError::Timeout("waiting for the peer to connect"))?
                .ok_or(NetError::Shutdown)?;
            accepted.put(cmd, s);
            if let Some((d, m)) = accepted.take_pair() {
                break (d, m, true);
            }
        }
    };
    socket::tune(&data, socket::Role::Data, &config.net)?;
    socket::tune(&meta, socket::Role::Meta, &config.net)?;
    Ok((data, meta, accepted_meta))
}

async fn connect(peer: SocketAddr) -> Result<TcpStream, NetError> {
    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer))
        .await
        .map_err(|_| NetError::Timeout("connect"))?
        .map_err(NetError::Io)
}
