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
//! receiver (which also pings). Any failure drops the whole connection, the replica is told
//! (its core marks every write not yet barrier-acked out of sync), and the manager
//! reconnects with exponential back-off (100 ms doubling up to `connect-int`); the delay
//! starts again at 100 ms only after a connection that got through the handshake, so a
//! peer that fails the handshake every time is retried at most every `connect-int`.
//! Every failure is in status (`connection_error`, `connection_error_at`).
//!
//! A peer refused for a permanent reason ([`NetError::Refused`]: different wire protocol,
//! a disk smaller than this node's, both Primary, an unsupported option) puts the node
//! StandAlone, as DRBD's `C_DISCONNECTING` does: one error line, status says why, and the
//! operator runs `tandem connect` after fixing it. A StandAlone node closes every
//! replication socket at once (DRBD does not even listen). Timeouts and lost sockets are
//! not permanent: they are retried with the back-off.
//!
//! Bounds: the first packet of an accepted socket must arrive within
//! [`FIRST_PACKET_TIMEOUT`] (3 s) (one already there when the socket is accepted, as a
//! peer's is, is read at once and the socket never waits); at most
//! [`MAX_UNCLASSIFIED_SOCKETS`] (16) wait for it,
//! [`MAX_UNCLASSIFIED_PER_SOURCE`] (8) per source address, and a new socket is never
//! refused for lack of room: the oldest waiting one (of its own source first) is closed
//! instead, so squatters cannot keep the peer out. Classified sockets wait for their
//! partner in one slot per role (a newer socket replaces an older one, as DRBD's "initial
//! packet crossed") for at most [`PENDING_TIMEOUT`] (10 s). An accepted pair must send
//! its first handshake bytes within [`FIRST_PACKET_TIMEOUT`], and a newer complete pair
//! arriving before that replaces it (the real peer sends its features at once); a pair
//! that fails the handshake is dropped and the next pair is taken. The peer's first
//! handshake packet
//! must arrive within [`FIRST_PACKET_TIMEOUT`], the whole handshake within
//! [`HANDSHAKE_TIMEOUT`] (10 s). Every warning a remote party can cause is rate-limited
//! (`crate::ratelog`). The send queues
//! hold at most `max-buffers` × 4 + 64 packets (more than the core can have in flight,
//! so a full queue is a bug and drops the connection); a packet is at most 1 MiB of data
//! plus its sub-header (the codec refuses larger lengths before anything is read).
//! Liveness: the meta socket pings after `ping-int` of silence and gives up after
//! `ping-timeout` without an answer, DRBD's defaults 10 s and 0.5 s.

pub mod handshake;
mod link;
pub mod liveness;
mod port;
mod session;
pub mod socket;

use link::Outgoing;
pub use link::{Link, SendError, Stream};
pub use port::{LinkEvent, PeerData, PeerEvent, PeerWrite, PeerWriteKind, Replica, SourceStart};

use crate::config::{Config, NodeConfig};
use crate::state::ConnState;
use crate::wire::{self, Command, Header, WireCtx};
use futures_util::FutureExt;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// Time an accepted socket has to send its first packet.
pub const FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(3);
/// Time the whole handshake (features … state) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted sockets whose first packet is still awaited; one more closes the oldest.
pub const MAX_UNCLASSIFIED_SOCKETS: usize = 16;
/// Of those, from one source address; one more closes that source's oldest.
pub const MAX_UNCLASSIFIED_PER_SOURCE: usize = 8;
/// A classified socket (`P_INITIAL_DATA` or `P_INITIAL_META`) waits this long for its
/// partner; older ones are closed. One of each role waits; a newer one replaces it.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a `connect()` to the peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// First reconnect delay; doubles up to `connect-int`.
pub const BACKOFF_START: Duration = Duration::from_millis(100);

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
    /// This node's UUIDs, role or disk changed during the handshake (the peer decided
    /// on what it had sent): the connection is made again.
    #[error("{0}")]
    Changed(String),
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
pub async fn run<R: Replica>(
    replica: Arc<R>,
    config: Config,
    me: NodeConfig,
    peer: NodeConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = loop {
        match bind(me.address) {
            Ok(l) => break l,
            Err(e) => {
                crate::warn_limited!(
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
    let accepted = Arc::new(Accepted::default());
    let acceptor = tokio::spawn(accept_loop(listener, accepted.clone(), replica.clone()));
    let active = is_active(me.address, peer.address);
    let mut backoff = BACKOFF_START;
    let mut session_no = 0u64;
    while !*shutdown.borrow() {
        if replica.is_standalone() {
            replica.link_event(LinkEvent::State(ConnState::StandAlone));
            accepted.clear();
            tokio::select! {
                _ = replica.wait_connect_allowed() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            // `connect`: a fresh start, with the shortest delay.
            backoff = BACKOFF_START;
            continue;
        }
        replica.link_event(LinkEvent::State(ConnState::WFConnection));
        let sockets = tokio::select! {
            s = establish(active, peer.address, &accepted, &config) => s,
            _ = shutdown.wait_for(|s| *s) => break,
            _ = replica.wait_standalone() => continue,
        };
        let (data, meta, resolve_conflicts) = match sockets {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!("no connection to {} yet: {e}", peer.name);
                replica.link_event(LinkEvent::Error(Some(format!(
                    "no connection to {}: {e}",
                    peer.name
                ))));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    // A pair the peer opened to us ends the wait at once.
                    _ = accepted.wait_pair() => {}
                    _ = shutdown.wait_for(|s| *s) => break,
                    _ = replica.wait_standalone() => {}
                }
                backoff = (backoff * 2).min(config.net.connect_interval);
                continue;
            }
        };
        if resolve_conflicts {
            // An accepted pair must start talking (the peer sends its features at once);
            // a newer pair arriving first replaces a silent one, so a squatter's fake pair
            // cannot hold the door while the real peer waits.
            let mut first_byte = [0u8; 1];
            tokio::select! {
                biased;
                // `peek`, not `readable`: the readiness left over from the first packet
                // would answer at once.
                r = tokio::time::timeout(FIRST_PACKET_TIMEOUT, data.peek(&mut first_byte)) => {
                    if r.is_err() {
                        crate::warn_limited!(
                            "refused an accepted replication socket pair: no handshake within \
                             {FIRST_PACKET_TIMEOUT:?}"
                        );
                        continue;
                    }
                }
                _ = accepted.wait_pair() => {
                    crate::warn_limited!(
                        "refused an accepted replication socket pair: silent, and a newer pair \
                         arrived"
                    );
                    continue;
                }
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        session_no += 1;
        replica.link_event(LinkEvent::State(ConnState::WFReportParams));
        let mut established = false;
        let result = tokio::select! {
            r = session::run(
                replica.clone(), &config, &peer, (data, meta), resolve_conflicts, session_no,
                &mut established,
            ) => r,
            _ = shutdown.wait_for(|s| *s) => Err(NetError::Shutdown),
        };
        replica.link_event(LinkEvent::Lost(session_no));
        report_end(&*replica, &peer, established, result);
        if *shutdown.borrow() {
            break;
        }
        // Only a connection that got through the handshake starts the back-off afresh: a
        // peer that fails the handshake every time is retried ever more slowly.
        backoff = if established {
            BACKOFF_START
        } else {
            (backoff * 2).min(config.net.connect_interval)
        };
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => break,
            _ = replica.wait_standalone() => {}
        }
    }
    acceptor.abort();
    replica.link_event(LinkEvent::State(ConnState::StandAlone));
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

/// Accepted sockets whose first packet is still awaited: id → (source, task).
#[derive(Default)]
struct Unclassified {
    next: u64,
    live: BTreeMap<u64, (IpAddr, tokio::task::AbortHandle)>,
}

impl Unclassified {
    /// Makes room for one more socket from `ip`: the oldest socket of that source when it
    /// has [`MAX_UNCLASSIFIED_PER_SOURCE`], else the oldest of all when there are
    /// [`MAX_UNCLASSIFIED_SOCKETS`]. Returns the evicted socket's source.
    fn make_room(&mut self, ip: IpAddr) -> Option<IpAddr> {
        let same = self.live.values().filter(|(i, _)| *i == ip).count();
        let victim = if same >= MAX_UNCLASSIFIED_PER_SOURCE {
            self.live
                .iter()
                .find(|(_, (i, _))| *i == ip)
                .map(|(id, _)| *id)
        } else if self.live.len() >= MAX_UNCLASSIFIED_SOCKETS {
            self.live.keys().next().copied()
        } else {
            None
        }?;
        let (from, task) = self.live.remove(&victim)?;
        task.abort();
        Some(from)
    }
}

/// Removes an unclassified socket's entry when its task ends (or is aborted).
struct Unlist {
    table: Arc<std::sync::Mutex<Unclassified>>,
    id: u64,
}

impl Drop for Unlist {
    fn drop(&mut self) {
        lock(&self.table).live.remove(&self.id);
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reports how connection attempt `result` ended: log, status error, and the permanent
/// refusals (split brain, an incompatible peer) that make the node StandAlone.
fn report_end<R: Replica>(
    replica: &R,
    peer: &NodeConfig,
    established: bool,
    result: Result<(), NetError>,
) {
    let stage = if established {
        "connection to"
    } else {
        "handshake with"
    };
    match result {
        Ok(()) | Err(NetError::Shutdown) => {}
        Err(NetError::Closed) => {
            crate::warn_limited!("{stage} {} lost: peer closed it", peer.name);
            replica.link_event(LinkEvent::Error(Some(format!(
                "{stage} {}: peer closed the connection",
                peer.name
            ))));
        }
        Err(NetError::SplitBrain(why)) => {
            // DRBD: "Split-Brain detected, dropping connection!" and StandAlone;
            // nothing is overwritten until an operator decides.
            tracing::error!(
                "split brain with {}: {why}; staying StandAlone (resolve it, then `tandem \
                 connect`)",
                peer.name
            );
            replica.link_event(LinkEvent::Error(Some(format!("split brain: {why}"))));
            replica.link_event(LinkEvent::SplitBrain(why));
        }
        Err(NetError::Refused(why)) => {
            // DRBD: an incompatible peer (protocol, size, roles) is a permanent
            // refusal: C_DISCONNECTING, then StandAlone until the operator connects.
            tracing::error!(
                "refused peer {}: {why}; staying StandAlone (fix it, then `tandem connect`)",
                peer.name
            );
            replica.link_event(LinkEvent::Error(Some(format!(
                "refused peer {}: {why}",
                peer.name
            ))));
            replica.link_event(LinkEvent::Refused);
        }
        Err(e) => {
            crate::warn_limited!("{stage} {} failed: {e}", peer.name);
            replica.link_event(LinkEvent::Error(Some(format!(
                "{stage} {}: {e}",
                peer.name
            ))));
        }
    }
}

/// Accepts sockets forever; each must send `P_INITIAL_DATA` or `P_INITIAL_META` first.
/// A new socket never finds the door shut: when the waiting room is full, the oldest
/// unclassified socket (of the same source first) is closed instead (see the module docs).
async fn accept_loop<R: Replica>(listener: TcpListener, accepted: Arc<Accepted>, replica: Arc<R>) {
    let table = Arc::new(std::sync::Mutex::new(Unclassified::default()));
    loop {
        let (mut stream, from) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                crate::warn_limited!("replication accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if replica.is_standalone() {
            // DRBD does not listen while StandAlone; closing at once is the same to a peer.
            tracing::debug!("closed replication socket from {from}: StandAlone");
            continue;
        }
        // Fast path: a peer sends its first packet right after connecting, so it is
        // usually here already; such a socket never enters the waiting room (where a
        // flood from the same address could evict it before it is read).
        let mut peek = [0u8; 8];
        if matches!(stream.peek(&mut peek).now_or_never(), Some(Ok(n)) if n >= peek.len()) {
            let first = read_control(&mut stream, &WireCtx::pre_features())
                .now_or_never()
                .unwrap_or(Err(NetError::Protocol(
                    "first packet incomplete (P_INITIAL_DATA/META have no payload)".into(),
                )));
            file_socket(first, stream, from, &accepted, &*replica);
            continue;
        }
        let mut t = lock(&table);
        if let Some(evicted) = t.make_room(from.ip()) {
            crate::warn_limited!(
                "refused replication socket from {evicted}: closed to make room for {from} \
                 (at most {MAX_UNCLASSIFIED_SOCKETS} sockets, {MAX_UNCLASSIFIED_PER_SOURCE} per \
                 source, may await their first packet)"
            );
        }
        let id = t.next;
        t.next += 1;
        let unlist = Unlist {
            table: table.clone(),
            id,
        };
        let accepted = accepted.clone();
        let replica = replica.clone();
        let task = tokio::spawn(async move {
            let _unlist = unlist;
            let first = tokio::time::timeout(
                FIRST_PACKET_TIMEOUT,
                read_control(&mut stream, &WireCtx::pre_features()),
            )
            .await
            .unwrap_or(Err(NetError::Timeout("no first packet within 3 s")));
            file_socket(first, stream, from, &accepted, &*replica);
        });
        t.live.insert(id, (from.ip(), task.abort_handle()));
    }
}

/// Files an accepted socket by its first packet, or refuses it (rate-limited warning).
fn file_socket<R: Replica>(
    first: Result<(Header, wire::Packet), NetError>,
    stream: TcpStream,
    from: SocketAddr,
    accepted: &Accepted,
    replica: &R,
) {
    let cmd = match first {
        Err(e) => {
            crate::warn_limited!("refused replication socket from {from}: {e}");
            return;
        }
        Ok((_, wire::Packet::Empty(cmd)))
            if cmd == Command::P_INITIAL_DATA || cmd == Command::P_INITIAL_META =>
        {
            cmd
        }
        Ok((hdr, _)) => {
            crate::warn_limited!(
                "refused replication socket from {from}: protocol error, first packet is {} \
                 (expected P_INITIAL_DATA or P_INITIAL_META)",
                hdr.command.name()
            );
            return;
        }
    };
    if replica.conn_state() >= ConnState::Connected {
        crate::warn_limited!("refused replication socket from {from}: already connected");
        return;
    }
    accepted.put(cmd, stream);
}

/// A classified socket waiting for its partner, and since when.
type Waiting = Option<(TcpStream, Instant)>;

/// Accepted sockets, sorted by their first packet, waiting to form a pair. Shared by the
/// accept tasks (which file sockets) and the manager (which takes pairs).
#[derive(Debug, Default)]
struct Accepted {
    slots: std::sync::Mutex<(Waiting, Waiting)>,
    /// A complete pair may be there.
    paired: Notify,
}

impl Accepted {
    /// Files one accepted socket; a role arriving twice replaces the older socket (DRBD:
    /// "initial packet crossed"), so a squatter's lone socket never blocks the real pair.
    fn put(&self, cmd: Command, s: TcpStream) {
        let mut g = lock(&self.slots);
        let slot = if cmd == Command::P_INITIAL_DATA {
            &mut g.0
        } else {
            &mut g.1
        };
        *slot = Some((s, Instant::now()));
        if g.0.is_some() && g.1.is_some() {
            self.paired.notify_one();
        }
    }

    /// Takes a complete pair; a socket that waited more than [`PENDING_TIMEOUT`] for its
    /// partner is dropped first.
    fn take_pair(&self) -> Option<(TcpStream, TcpStream)> {
        let mut guard = lock(&self.slots);
        let g = &mut *guard;
        for slot in [&mut g.0, &mut g.1] {
            if slot
                .as_ref()
                .is_some_and(|(_, t)| t.elapsed() > PENDING_TIMEOUT)
            {
                *slot = None;
            }
        }
        match (g.0.take(), g.1.take()) {
            (Some((d, _)), Some((m, _))) => Some((d, m)),
            (d, m) => {
                *g = (d, m);
                None
            }
        }
    }

    fn has_pair(&self) -> bool {
        let g = lock(&self.slots);
        g.0.is_some() && g.1.is_some()
    }

    /// Resolves when a complete pair is waiting.
    async fn wait_pair(&self) {
        while !self.has_pair() {
            self.paired.notified().await;
        }
    }

    fn clear(&self) {
        *lock(&self.slots) = (None, None);
    }
}

/// Makes the data and meta sockets. Both sides accept: a pair the peer opened is used
/// whenever it is complete (a kernel DRBD peer connects from either side). The active
/// side also connects; the passive side waits up to `connect-int` for the peer. The bool
/// says whether this node accepted the meta socket (it then holds `RESOLVE_CONFLICTS`).
async fn establish(
    active: bool,
    peer: SocketAddr,
    accepted: &Accepted,
    config: &Config,
) -> Result<(TcpStream, TcpStream, bool), NetError> {
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
            tokio::time::timeout_at(deadline, accepted.wait_pair())
                .await
                .map_err(|_| NetError::Timeout("waiting for the peer to connect"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_waiting_room_closes_the_oldest_socket_of_the_same_source_first() {
        let mut t = Unclassified::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let mut tasks = Vec::new();
        let mut add = |t: &mut Unclassified, ip: IpAddr| {
            let task = tokio::spawn(std::future::pending::<()>());
            t.live.insert(t.next, (ip, task.abort_handle()));
            t.next += 1;
            tasks.push(task);
        };
        add(&mut t, b);
        for _ in 0..MAX_UNCLASSIFIED_PER_SOURCE {
            assert_eq!(t.make_room(a), None);
            add(&mut t, a);
        }
        // `a` is at its limit: its oldest (id 1) goes, not `b`'s older socket (id 0).
        assert_eq!(t.make_room(a), Some(a));
        assert!(t.live.contains_key(&0) && !t.live.contains_key(&1));
        // The room is full with other sources: the oldest of all goes.
        while t.live.len() < MAX_UNCLASSIFIED_SOCKETS {
            let ip = IpAddr::from([10, 0, 1, u8::try_from(t.next % 200).unwrap_or(0)]);
            add(&mut t, ip);
        }
        assert_eq!(t.make_room([10, 9, 9, 9].into()), Some(b));
        assert!(!t.live.contains_key(&0));
        for task in tasks {
            task.abort();
        }
    }
}
