//! NBD sockets and concurrency: listeners, the per-connection handshake, and pipelined
//! transmission with out-of-order replies.
//!
//! Per connection, one reader (the connection's task) decodes requests and starts each;
//! the newest one runs inside the reader task while it waits for the next header, and
//! moves to its own tokio task only when more input arrives first (so QD1 costs no task
//! spawn, QD>1 pipelines as before); a semaphore of [`NbdOptions::max_in_flight`]
//! (default 128) permits bounds them, and so does a budget of [`MAX_BYTES_IN_FLIGHT`]
//! (64 MiB) of READ/WRITE data per connection; when either is exhausted the reader stops
//! reading, which back-pressures the client through TCP. Each finished request writes its
//! reply (header and data in one vectored write) through a mutex-guarded writer, so
//! replies leave in completion order with no extra task hop on the latency path. WRITE
//! payloads are read into an [`AlignedBuf`]; payload bytes that arrived together with a
//! header sit in the 16 KiB read buffer and are copied from there (this batches small
//! requests into one `read`), the rest of a large payload is read straight into the
//! `AlignedBuf`. A READ gets a fresh `AlignedBuf` of its length, which the target fills
//! and returns for the reply (the target allocates nothing). A TRIM or WRITE_ZEROES
//! longer than the target's limit is split (`submit_split`). Every request is submitted
//! on queue `connection number mod` [`NBD_QUEUES`].
//!
//! On `NBD_CMD_DISC`, a protocol error, EOF, a failed reply or server shutdown the reader
//! stops, every request already started runs to completion and is answered, then the
//! socket is closed. A client that stops reading replies cannot hold the connection
//! forever: after [`DRAIN_GRACE`] blocked reply writes are abandoned (the target's
//! operations still finish). A handshake has [`NbdOptions::handshake_timeout`] (10 s).
//!
//! Neighbours: a listener holds [`NbdOptions::max_connections`] (64) connections, at most
//! [`NbdOptions::max_per_source`] (32) from one TCP source address. When a new client
//! finds no room, the connection idle longest — no request in flight and none received
//! for [`NbdOptions::idle_timeout`] (60 s, `[nbd] idle-timeout`) — is closed for it;
//! otherwise the new one is closed at once (rate-limited warning). Idle connections are
//! never closed while nobody needs their slot (qemu and the kernel's nbd-client keep a
//! quiet guest's connection open). READ/WRITE data in flight is bounded per connection
//! ([`MAX_BYTES_IN_FLIGHT`], 64 MiB) and over all connections of every listener sharing a
//! [`DataBudget`] ([`DEFAULT_DATA_BUDGET`], 256 MiB, `[nbd] data-budget`): N slow readers
//! hold at most the budget, not N × 64 MiB. A reply write or a WRITE payload that takes
//! longer than [`REPLY_TIMEOUT`] (30 s) closes the connection, so no client pins its share
//! forever; when the budget drains after a burst of ≥ 64 MiB the freed heap is given back
//! to the kernel (`malloc_trim`, at most once per second).

use super::proto::{self, Action, Export, Handshake, HandshakeError, Step, REQUEST_LEN};
use crate::frontend::{BlockError, BlockIo, BlockReply, BlockRequest, BlockTarget, TargetInfo};
use crate::store::AlignedBuf;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Mutex, Notify, Semaphore};
use tokio::task::JoinSet;

/// Default bound on open connections per listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default bound on requests in flight per connection.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 128;
/// Bytes of READ/WRITE data one connection may have in flight (buffers held from the
/// payload read to the reply); a request that does not fit waits before its payload is
/// read, which back-pressures the client. It holds two of the largest requests (32 MiB).
pub const MAX_BYTES_IN_FLIGHT: usize = 64 << 20;
/// Unit of the byte budget's semaphore.
const BUDGET_UNIT: usize = 4096;
/// Default time a client has to finish option haggling.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle time after which a connection may lose its slot to a new client.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound on open connections per source address (TCP; half the listener's).
pub const DEFAULT_MAX_PER_SOURCE: usize = DEFAULT_MAX_CONNECTIONS / 2;
/// Default bytes of READ/WRITE data in flight over all connections sharing a
/// [`DataBudget`] (the daemon shares one between its listeners).
pub const DEFAULT_DATA_BUDGET: usize = 256 << 20;
/// Time one reply may take to be written (after it got the socket), and a WRITE's payload
/// to arrive after its header; a client that reads (or sends) nothing for this long is
/// disconnected, so it cannot pin its share of the budget.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// At most one `malloc_trim` per this interval when the budget has drained.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// A burst is trimmed after it drained only if its peak use of the shared budget reached
/// this (smaller ones are what glibc keeps for reuse on purpose: see `tune_allocator`).
const TRIM_AFTER: usize = 64 << 20;
/// How long a closing connection waits for blocked reply writes before abandoning them.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);
/// Read buffer per connection: holds many pipelined headers; payloads larger than this
/// bypass it.
const READ_BUF_LEN: usize = 16 * 1024;
/// Pause after a failed `accept` (EMFILE and the like) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Protocol-violation warnings logged per connection before the rest go to `debug`.
const WARN_BUDGET: u32 = 16;
/// Queue indexes NBD connections use: connection `n` of a listener submits on queue
/// `n mod NBD_QUEUES` (the default connection limit), so per-queue stats would tell
/// connections apart; [`serve_connection`] uses queue 0.
pub(crate) const NBD_QUEUES: u64 = DEFAULT_MAX_CONNECTIONS as u64;

/// Serving parameters.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// The export's canonical name; clients may also ask for the empty default name.
    pub export_name: String,
    /// Sent as `NBD_INFO_DESCRIPTION` when a client asks (empty: not sent).
    pub description: String,
    /// Open connections per listener; more are closed at once.
    pub max_connections: usize,
    /// Requests in flight per connection (at least 1).
    pub max_in_flight: u32,
    /// Time limit for the handshake.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight and none received for this long is closed
    /// when a new client needs its slot (listener or source full). Not closed otherwise:
    /// qemu and the kernel's nbd-client keep a quiet guest's connection open.
    pub idle_timeout: Duration,
    /// Open TCP connections per source address (Unix sockets: no limit beyond the
    /// listener's).
    pub max_per_source: usize,
    /// READ/WRITE data in flight, shared by every connection of every listener given
    /// the same budget.
    pub data_budget: Arc<DataBudget>,
}

/// A byte budget for READ/WRITE data in flight, shared by connections (and listeners):
/// a request waits for its share before its buffer exists, so N slow clients hold at
/// most the budget, not N × [`MAX_BYTES_IN_FLIGHT`]. When it drains completely after use,
/// freed memory is given back to the kernel (`malloc_trim`, at most once per second).
#[derive(Debug)]
pub struct DataBudget {
    sem: Semaphore,
    units: u32,
    /// Milliseconds since `origin` of the last trim.
    last_trim: std::sync::atomic::AtomicU64,
    /// Peak units in use since the last trim.
    peak: AtomicU32,
    origin: std::time::Instant,
}

impl DataBudget {
    /// A budget of `bytes` (at least one largest request, 32 MiB).
    pub fn new(bytes: usize) -> Arc<Self> {
        let bytes = bytes.max(proto::MAX_BLOCK as usize);
        let units = u32::try_from(bytes / BUDGET_UNIT).unwrap_or(u32::MAX >> 3);
        Arc::new(Self {
            sem: Semaphore::new(units as usize),
            units,
            last_trim: std::sync::atomic::AtomicU64::new(0),
            peak: AtomicU32::new(0),
            origin: std::time::Instant::now(),
        })
    }

    /// Bytes the budget holds.
    pub fn bytes(&self) -> usize {
        self.units as usize * BUDGET_UNIT
    }

    /// Notes the use after an acquire (for the trim after a burst).
    fn note_use(&self) {
        let free = u32::try_from(self.sem.available_permits()).unwrap_or(self.units);
        self.peak
            .fetch_max(self.units.saturating_sub(free), Ordering::Relaxed);
    }

    /// Gives freed memory back if the budget is entirely free again after a burst.
    fn trim_if_drained(&self) {
        if self.sem.available_permits() != self.units as usize
            || (self.peak.load(Ordering::Relaxed) as usize) * BUDGET_UNIT < TRIM_AFTER
        {
            return;
        }
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_trim.load(Ordering::Relaxed);
        let interval = u64::try_from(TRIM_INTERVAL.as_millis()).unwrap_or(1000);
        if now.saturating_sub(last) < interval
            || self
                .last_trim
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.peak.store(0, Ordering::Relaxed);
        crate::store::release_free_memory();
    }
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            export_name: String::new(),
            description: String::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_per_source: DEFAULT_MAX_PER_SOURCE,
            data_budget: DataBudget::new(DEFAULT_DATA_BUDGET),
        }
    }
}

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address (with the real port after binding port 0).
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound NBD listening socket; [`NbdListener::serve`] runs it. Dropping it removes the
/// Unix socket file it created (if still the same file).
#[derive(Debug)]
pub struct NbdListener {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// (device, inode) of the socket file we created, to remove only our own.
        id: (u64, u64),
    },
}

impl NbdListener {
    /// Binds a TCP listener (`SO_REUSEADDR`; accepted sockets get `TCP_NODELAY`).
    pub async fn bind_tcp(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self {
            inner: Inner::Tcp(TcpListener::bind(addr).await?),
        })
    }

    /// Binds a Unix socket at `path` with mode 0600 (set before `listen`, so no client can
    /// connect through looser permissions). A stale socket file is replaced; a socket that
    /// a live server still accepts on, or any file that is not a socket, is refused.
    /// Must be called inside a tokio runtime.
    pub fn bind_unix(path: &Path) -> io::Result<Self> {
        crate::sockfile::clear_stale(path, "nbd-socket")?;
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        socket.bind(&socket2::SockAddr::unix(path)?)?;
        let meta = std::fs::symlink_metadata(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        let listener = UnixListener::from_std(socket.into())?;
        Ok(Self {
            inner: Inner::Unix {
                listener,
                path: path.to_path_buf(),
                id: (meta.dev(), meta.ino()),
            },
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match &self.inner {
            Inner::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            Inner::Unix { path, .. } => Ok(ListenAddr::Unix(path.clone())),
        }
    }

    /// Serves `target` until `shutdown` becomes true (or its sender is dropped), then
    /// stops accepting, lets every connection finish its requests in flight, and returns.
    pub async fn serve<T: BlockTarget>(
        self,
        target: Arc<T>,
        opts: NbdOptions,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let opts = Arc::new(opts);
        let table = Arc::new(std::sync::Mutex::new(ConnTable::default()));
        let mut conns: JoinSet<()> = JoinSet::new();
        let mut seq: u64 = 0;
        let local = self.local_addr()?;
        tracing::info!(listen = %local, "NBD server listening");
        loop {
            let accepted = tokio::select! {
                _ = wait_shutdown(&mut shutdown) => break,
                Some(joined) = conns.join_next(), if !conns.is_empty() => {
                    reap(joined);
                    continue;
                }
                a = self.accept(&mut seq) => a,
            };
            let (stream, peer, ip) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    crate::warn_limited!("NBD {local}: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let activity = match lock(&table).admit(ip, &opts) {
                Ok(a) => a,
                Err(why) => {
                    crate::warn_limited!("NBD {local}: refused connection from {peer}: {why}");
                    continue;
                }
            };
            let unlist = Unlist {
                table: Arc::clone(&table),
                id: activity.id,
            };
            let (target, opts, shutdown) =
                (Arc::clone(&target), Arc::clone(&opts), shutdown.clone());
            match stream {
                Accepted::Tcp(s) => {
                    let (r, w) = s.into_split();
                    conns.spawn(async move {
                        serve_tracked(r, w, &peer, target, &opts, shutdown, &activity).await;
                        drop(unlist);
                    });
                }
                Accepted::Unix(s) => {
                    let (r, w) = s.into_split();
                    conns.spawn(async move {
                        serve_tracked(r, w, &peer, target, &opts, shutdown, &activity).await;
                        drop(unlist);
                    });
                }
            }
        }
        tracing::info!(
            listen = %local,
            "NBD server stopping; draining {} connections",
            conns.len()
        );
        while let Some(joined) = conns.join_next().await {
            reap(joined);
        }
        Ok(())
    }

    async fn accept(&self, seq: &mut u64) -> io::Result<(Accepted, String, Option<IpAddr>)> {
        match &self.inner {
            Inner::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                if let Err(e) = s.set_nodelay(true) {
                    crate::warn_limited!("NBD {peer}: cannot set TCP_NODELAY: {e}");
                }
                Ok((Accepted::Tcp(s), peer.to_string(), Some(peer.ip())))
            }
            Inner::Unix { listener, path, .. } => {
                let (s, _) = listener.accept().await?;
                *seq += 1;
                Ok((
                    Accepted::Unix(s),
                    format!("unix:{}#{seq}", path.display()),
                    None,
                ))
            }
        }
    }
}

impl Drop for NbdListener {
    fn drop(&mut self) {
        if let Inner::Unix { path, id, .. } = &self.inner {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if (m.dev(), m.ino()) == *id {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the listener knows of one open connection, to pick an idle one to close.
struct Activity {
    id: u64,
    /// When the connection was opened or last received a request.
    last: std::sync::Mutex<std::time::Instant>,
    /// Requests started and not yet answered.
    busy: std::sync::atomic::AtomicU32,
    /// Asks the connection to close (it lost its slot).
    evict: Notify,
}

impl Activity {
    fn new(id: u64) -> Arc<Self> {
        Arc::new(Self {
            id,
            last: std::sync::Mutex::new(std::time::Instant::now()),
            busy: std::sync::atomic::AtomicU32::new(0),
            evict: Notify::new(),
        })
    }

    fn touch(&self) {
        *lock(&self.last) = std::time::Instant::now();
    }

    /// How long it has been idle (no request in flight), or None while busy.
    fn idle_for(&self) -> Option<Duration> {
        (self.busy.load(Ordering::Acquire) == 0).then(|| lock(&self.last).elapsed())
    }
}

/// The open connections of one listener.
#[derive(Default)]
struct ConnTable {
    next: u64,
    conns: std::collections::BTreeMap<u64, (Option<IpAddr>, Arc<Activity>)>,
}

impl ConnTable {
    /// Admits a new connection from `ip`: when the listener (or the source) is full, the
    /// connection idle longest, if idle for at least `idle_timeout`, is told to close and
    /// gives its slot; otherwise the new one is refused with the reason.
    fn admit(&mut self, ip: Option<IpAddr>, opts: &NbdOptions) -> Result<Arc<Activity>, String> {
        let same = |e: &(Option<IpAddr>, Arc<Activity>)| ip.is_some() && e.0 == ip;
        let from_source = self.conns.values().filter(|e| same(e)).count();
        let full = if ip.is_some() && from_source >= opts.max_per_source {
            Some(format!(
                "{} connections from this address already open",
                opts.max_per_source
            ))
        } else if self.conns.len() >= opts.max_connections {
            Some(format!("{} connections already open", opts.max_connections))
        } else {
            None
        };
        if let Some(why) = full {
            let source_full = ip.is_some() && from_source >= opts.max_per_source;
            let victim = self
                .conns
                .iter()
                .filter(|(_, e)| !source_full || same(e))
                .filter_map(|(id, (_, a))| a.idle_for().map(|d| (d, *id)))
                .filter(|(d, _)| *d >= opts.idle_timeout)
                .max();
            let Some((idle, id)) = victim else {
                return Err(format!("{why}, none idle for {:?}", opts.idle_timeout));
            };
            if let Some((_, a)) = self.conns.remove(&id) {
                tracing::info!(
                    "NBD: closing a connection idle for {} s to make room ({why})",
                    idle.as_secs()
                );
                a.evict.notify_one();
            }
        }
        let id = self.next;
        self.next += 1;
        let a = Activity::new(id);
        self.conns.insert(id, (ip, Arc::clone(&a)));
        Ok(a)
    }
}

/// Removes a connection from its listener's table when its task ends.
struct Unlist {
    table: Arc<std::sync::Mutex<ConnTable>>,
    id: u64,
}

impl Drop for Unlist {
    fn drop(&mut self) {
        lock(&self.table).conns.remove(&self.id);
    }
}

fn reap(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        tracing::error!("NBD connection task failed: {e}");
    }
}

/// Binds `path` (see [`NbdListener::bind_unix`]) and serves until `shutdown`.
pub async fn serve_unix<T: BlockTarget>(
    path: &Path,
    target: Arc<T>,
    opts: NbdOptions,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    NbdListener::bind_unix(path)?
        .serve(target, opts, shutdown)
        .await
}

/// Binds `addr` (see [`NbdListener::bind_tcp`]) and serves until `shutdown`.
pub async fn serve_tcp<T: BlockTarget>(
    addr: SocketAddr,
    target: Arc<T>,
    opts: NbdOptions,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    NbdListener::bind_tcp(addr)
        .await?
        .serve(target, opts, shutdown)
        .await
}

/// Resolves when the value is true or the sender is gone.
async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
    /// The client sent `NBD_CMD_DISC`.
    Disconnected,
    /// The client closed the stream between messages.
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// A reply could not be written (the client went away) or was abandoned.
    ReplyFailed,
    /// The handshake failed or timed out.
    HandshakeFailed(String),
    /// The client broke the protocol (bad magic, truncated message, oversized write).
    Protocol(String),
    /// A socket error.
    Io(String),
    /// The connection was idle and a new client needed its slot.
    Evicted,
}

/// Serves one already-accepted connection (the handshake and transmission) and returns
/// how it ended, after logging it (`warn` for protocol violations, with `peer`).
pub async fn serve_connection<T, R, W>(
    reader: R,
    writer: W,
    peer: &str,
    target: Arc<T>,
    opts: &NbdOptions,
    shutdown: watch::Receiver<bool>,
) -> ConnectionEnd
where
    T: BlockTarget,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    serve_tracked(
        reader,
        writer,
        peer,
        target,
        opts,
        shutdown,
        &Activity::new(0),
    )
    .await
}

/// [`serve_connection`] with the listener's view of the connection (idle time, eviction).
async fn serve_tracked<T, R, W>(
    reader: R,
    mut writer: W,
    peer: &str,
    target: Arc<T>,
    opts: &NbdOptions,
    mut shutdown: watch::Receiver<bool>,
    activity: &Arc<Activity>,
) -> ConnectionEnd
where
    T: BlockTarget,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(READ_BUF_LEN, reader);
    let info = target.info();
    let export = Export {
        name: opts.export_name.clone(),
        description: opts.description.clone(),
        info,
    };
    let handshake = tokio::select! {
        r = tokio::time::timeout(
            opts.handshake_timeout,
            handshake(&mut reader, &mut writer, export),
        ) => r,
        _ = wait_shutdown(&mut shutdown) => Ok(Err(HsError::Shutdown)),
        () = activity.evict.notified() => Ok(Err(HsError::Evicted)),
    };
    let end = match handshake {
        Err(_) => ConnectionEnd::HandshakeFailed(format!(
            "handshake not finished within {:?}",
            opts.handshake_timeout
        )),
        Ok(Ok(Step::Transmit)) => {
            tracing::debug!(
                %peer,
                size = info.size_bytes,
                writable = info.writable,
                "NBD transmission"
            );
            // A client of a writable export holds the device open for writing until the
            // connection is over (its requests answered): `secondary` refuses meanwhile.
            let _open = info
                .writable
                .then(|| target.openers())
                .flatten()
                .map(|o| o.register(format!("NBD client {}", opener_name(peer))));
            activity.touch();
            transmission(reader, writer, peer, target, info, opts, shutdown, activity).await
        }
        Ok(Ok(_)) => ConnectionEnd::Aborted,
        Ok(Err(HsError::Shutdown)) => ConnectionEnd::Shutdown,
        Ok(Err(HsError::Evicted)) => ConnectionEnd::Evicted,
        Ok(Err(HsError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
            ConnectionEnd::HandshakeFailed(
                "client closed the connection during the handshake".into(),
            )
        }
        Ok(Err(HsError::Io(e))) => ConnectionEnd::Io(e.to_string()),
        Ok(Err(HsError::Proto(e))) => ConnectionEnd::HandshakeFailed(e.to_string()),
    };
    match &end {
        ConnectionEnd::HandshakeFailed(why) | ConnectionEnd::Protocol(why) => {
            crate::warn_limited!("NBD connection {peer} dropped, refused malformed input: {why}");
        }
        ConnectionEnd::Io(why) => tracing::info!(%peer, "NBD connection dropped: {why}"),
        other => tracing::debug!(%peer, "NBD connection ended: {other:?}"),
    }
    opts.data_budget.trim_if_drained();
    end
}

/// How a connection is named to the operator: `unix /path (#3)` or `tcp 127.0.0.1:4567`.
fn opener_name(peer: &str) -> String {
    match peer.strip_prefix("unix:") {
        Some(rest) => format!("unix {rest}"),
        None => format!("tcp {peer}"),
    }
}

enum HsError {
    Io(io::Error),
    Proto(HandshakeError),
    Shutdown,
    Evicted,
}

impl From<io::Error> for HsError {
    fn from(e: io::Error) -> Self {
        HsError::Io(e)
    }
}

async fn handshake<R, W>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    export: Export,
) -> Result<Step, HsError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&proto::greeting()).await?;
    writer.flush().await?;
    let mut hs = Handshake::new(export);
    let mut input = Vec::new();
    let mut out = Vec::with_capacity(512);
    loop {
        input.resize(hs.wants(), 0);
        reader.read_exact(&mut input).await?;
        out.clear();
        let step = hs.feed(&input, &mut out);
        if !out.is_empty() {
            let written = async {
                writer.write_all(&out).await?;
                writer.flush().await
            }
            .await;
            // After NBD_OPT_ABORT the client may already be gone: that is not an error.
            if step != Ok(Step::Abort) {
                written?;
            }
        }
        match step.map_err(HsError::Proto)? {
            Step::Continue => continue,
            done => return Ok(done),
        }
    }
}

/// A flag that tasks can wait on.
#[derive(Default)]
struct Flag {
    set: AtomicBool,
    notify: Notify,
}

impl Flag {
    fn raise(&self) -> bool {
        let first = !self.set.swap(true, Ordering::AcqRel);
        self.notify.notify_waiters();
        first
    }

    fn is_raised(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    async fn raised(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

/// What request tasks share: the write half and the connection's "closed" flag.
struct Replies<W> {
    writer: Mutex<W>,
    /// Raised when a reply write failed or blocked writes are abandoned: stop reading,
    /// send nothing more.
    closed: Flag,
    peer: Arc<str>,
}

impl<W: AsyncWrite + Unpin> Replies<W> {
    /// Sends one reply: the header and `data` in one vectored write.
    async fn send(&self, cookie: u64, error: u32, data: &[u8]) {
        if self.closed.is_raised() {
            return;
        }
        let header = proto::simple_reply(error, cookie);
        let written = tokio::select! {
            biased;
            r = async {
                let mut w = self.writer.lock().await;
                tokio::time::timeout(REPLY_TIMEOUT, write_reply(&mut *w, &header, data))
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("client read no reply data for {REPLY_TIMEOUT:?}"),
                        ))
                    })
            } => r,
            _ = self.closed.raised() => return,
        };
        if let Err(e) = written {
            if self.closed.raise() {
                tracing::info!(peer = %self.peer, "cannot send NBD reply: {e}");
            }
        }
    }

    /// Answers a finished request.
    async fn complete(
        &self,
        cookie: u64,
        read_len: Option<u32>,
        result: Result<BlockReply, BlockError>,
    ) {
        match (result, read_len) {
            (Ok(BlockReply::Data(buf)), Some(len)) if buf.len() == len as usize => {
                self.send(cookie, 0, &buf).await;
            }
            (Ok(reply), Some(len)) => {
                tracing::error!(
                    peer = %self.peer,
                    "target answered a {len}-byte read with {reply:?}"
                );
                self.send(cookie, proto::NBD_EIO, &[]).await;
            }
            (Ok(_), None) => self.send(cookie, 0, &[]).await,
            (Err(e), _) => {
                tracing::debug!(peer = %self.peer, cookie, "request failed: {e}");
                self.send(cookie, proto::nbd_error(e), &[]).await;
            }
        }
    }
}

/// Writes `header` then `data`, vectored, handling short writes.
async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &[u8],
    data: &[u8],
) -> io::Result<()> {
    let total = header.len() + data.len();
    let mut done = 0;
    while done < total {
        let n = match (
            header.get(done..),
            data.get(done.saturating_sub(header.len())..),
        ) {
            (Some(h), Some(d)) if !h.is_empty() => {
                w.write_vectored(&[IoSlice::new(h), IoSlice::new(d)])
                    .await?
            }
            (_, Some(d)) => w.write(d).await?,
            (_, None) => break,
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    w.flush().await
}

// The connection's parts, as the handshake left them: grouping them would only rename.
#[allow(clippy::too_many_arguments)]
async fn transmission<T, R, W>(
    mut reader: BufReader<R>,
    writer: W,
    peer: &str,
    target: Arc<T>,
    info: TargetInfo,
    opts: &NbdOptions,
    mut shutdown: watch::Receiver<bool>,
    activity: &Arc<Activity>,
) -> ConnectionEnd
where
    T: BlockTarget,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let replies = Arc::new(Replies {
        writer: Mutex::new(writer),
        closed: Flag::default(),
        peer: Arc::from(peer),
    });
    let max_in_flight = opts.max_in_flight.max(1);
    let window = Arc::new(Semaphore::new(max_in_flight as usize));
    let budgets = Budgets {
        conn: Arc::new(Semaphore::new(MAX_BYTES_IN_FLIGHT / BUDGET_UNIT)),
        shared: Arc::clone(&opts.data_budget),
        activity: Arc::clone(activity),
    };
    let mut inline: Option<InlineRequest> = None;
    let queue = u16::try_from(activity.id % NBD_QUEUES).unwrap_or(0);
    let end = tokio::select! {
        end = read_requests(
            &mut reader, &replies, &window, &budgets, &target, &info, queue, &mut inline,
        ) => end,
        _ = wait_shutdown(&mut shutdown) => ConnectionEnd::Shutdown,
        _ = replies.closed.raised() => ConnectionEnd::ReplyFailed,
        () = activity.evict.notified() => ConnectionEnd::Evicted,
    };
    // A request the reader was running itself is started like the others: it must finish.
    if let Some(request) = inline.take() {
        tokio::spawn(request);
    }
    // NBD_CMD_DISC semantics on every exit: requests already started finish and are
    // answered before the socket closes. Writes blocked on a client that does not read are
    // abandoned after the grace; the target's operations themselves always finish.
    let drained = tokio::time::timeout(DRAIN_GRACE, window.acquire_many(max_in_flight)).await;
    if drained.is_err() {
        crate::warn_limited!(
            "NBD {peer}: replies not drained within {DRAIN_GRACE:?}; abandoning them"
        );
        replies.closed.raise();
        let _ = window.acquire_many(max_in_flight).await;
    }
    let mut w = replies.writer.lock().await;
    let _ = w.shutdown().await;
    end
}

/// The byte budgets a READ/WRITE takes its share of (the connection's and the shared
/// one), and the connection's activity record.
struct Budgets {
    conn: Arc<Semaphore>,
    shared: Arc<DataBudget>,
    activity: Arc<Activity>,
}

/// A started request (target call + reply) that the reader task runs itself.
type InlineRequest = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Reads requests and starts each one. The newest request runs inside the reader task
/// (`inline`) while the reader waits for the next header, so a client with one request
/// at a time (QD1) costs no task spawn and no extra scheduling; as soon as more input
/// arrives while it is unfinished, it moves to its own task (a boxed future moves without
/// being disturbed) and pipelining continues as before. `inline` lives in the caller so
/// that a reader stopped from outside (shutdown) leaves it to be spawned, never dropped.
/// Every request is submitted on `queue`. A WRITE's payload buffer comes from the IO
/// buffer pool (`AlignedBuf::from_pool`): not zeroed, but the payload overwrites all of
/// it before anyone reads it (a short payload ends the connection).
// The connection's parts again; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
async fn read_requests<T, R, W>(
    reader: &mut BufReader<R>,
    replies: &Arc<Replies<W>>,
    window: &Arc<Semaphore>,
    budgets: &Budgets,
    target: &Arc<T>,
    info: &TargetInfo,
    queue: u16,
    inline: &mut Option<InlineRequest>,
) -> ConnectionEnd
where
    T: BlockTarget,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut header = [0u8; REQUEST_LEN];
    let mut warnings = 0u32;
    loop {
        if let Some(request) = inline.as_mut() {
            // Run the request until it finishes or the next request starts to arrive.
            let finished = reader.buffer().is_empty()
                && tokio::select! {
                    biased;
                    () = request.as_mut() => true,
                    _ = reader.fill_buf() => false,
                };
            if finished {
                *inline = None;
            } else if let Some(request) = inline.take() {
                tokio::spawn(request);
            }
        }
        // Take the in-flight slot before reading: a full window stops the reader.
        let Ok(permit) = Arc::clone(window).acquire_owned().await else {
            return ConnectionEnd::Shutdown;
        };
        match reader.fill_buf().await {
            Ok([]) => return ConnectionEnd::Closed,
            Ok(_) => {}
            Err(e) => return ConnectionEnd::Io(e.to_string()),
        }
        if let Err(e) = reader.read_exact(&mut header).await {
            return read_error(e, "request header");
        }
        budgets.activity.touch();
        let req = match proto::parse_request(&header) {
            Ok(r) => r,
            Err(e) => return ConnectionEnd::Protocol(e.to_string()),
        };
        let action = proto::classify(&req, info);
        // READ/WRITE data counts against the connection's byte budget until the reply is
        // sent. (No request runs inline here: the loop's head started or finished it.)
        let data_len = match action {
            Action::Read { len, .. } | Action::Write { len, .. } => len as usize,
            _ => 0,
        };
        let Some(budget) = take_budget(budgets, data_len).await else {
            return ConnectionEnd::Shutdown;
        };
        let io = match action {
            // The READ's buffer is this frontend's, filled and handed back by the target.
            Action::Read { offset, len } => match AlignedBuf::new(len as usize) {
                Ok(buf) => BlockIo::Read { offset, buf },
                Err(e) => return ConnectionEnd::Protocol(format!("READ buffer: {e}")),
            },
            Action::Write { offset, len, fua } => {
                let mut buf = match AlignedBuf::from_pool(len as usize) {
                    Ok(b) => b,
                    Err(e) => return ConnectionEnd::Protocol(format!("WRITE buffer: {e}")),
                };
                // The payload holds its share of the budget: it must come in time.
                match tokio::time::timeout(REPLY_TIMEOUT, reader.read_exact(&mut buf)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return read_error(e, "WRITE payload"),
                    Err(_) => {
                        return ConnectionEnd::Protocol(format!(
                            "WRITE payload of {len} bytes not received within {REPLY_TIMEOUT:?}"
                        ))
                    }
                }
                BlockIo::Write {
                    offset,
                    data: Arc::new(buf),
                    fua,
                }
            }
            Action::Flush => BlockIo::Flush,
            Action::Trim { offset, len, fua } => BlockIo::Discard {
                offset,
                len: u64::from(len),
                fua,
            },
            Action::WriteZeroes {
                offset,
                len,
                may_unmap,
                fua,
            } => BlockIo::WriteZeroes {
                offset,
                len: u64::from(len),
                may_unmap,
                fua,
            },
            Action::Disconnect => return ConnectionEnd::Disconnected,
            Action::Close { why } => return ConnectionEnd::Protocol(why.into()),
            Action::Refuse { errno, skip, why } => {
                let peer = &replies.peer;
                if errno == proto::NBD_EPERM || warnings >= WARN_BUDGET {
                    tracing::debug!(%peer, ?req, errno, "NBD request refused: {why}");
                } else {
                    warnings += 1;
                    crate::warn_limited!(
                        "NBD {peer}: request refused (errno {errno}): {why}; {req:?}"
                    );
                    if warnings == WARN_BUDGET {
                        tracing::info!(
                            %peer,
                            "further refusals on this connection are logged at debug level"
                        );
                    }
                }
                if skip > 0 {
                    let mut payload = (&mut *reader).take(u64::from(skip));
                    match tokio::io::copy_buf(&mut payload, &mut tokio::io::sink()).await {
                        Ok(n) if n == u64::from(skip) => {}
                        Ok(_) => return ConnectionEnd::Protocol("truncated WRITE payload".into()),
                        Err(e) => return ConnectionEnd::Io(e.to_string()),
                    }
                }
                replies.send(req.cookie, errno, &[]).await;
                continue;
            }
        };
        let read_len = match &io {
            BlockIo::Read { buf, .. } => u32::try_from(buf.len()).ok(),
            _ => None,
        };
        let (target, replies) = (Arc::clone(target), Arc::clone(replies));
        let activity = Arc::clone(&budgets.activity);
        activity.busy.fetch_add(1, Ordering::AcqRel);
        let info = *info;
        *inline = Some(Box::pin(async move {
            let result = submit_split(&*target, &info, queue, io).await;
            replies.complete(req.cookie, read_len, result).await;
            drop(budget);
            activity.busy.fetch_sub(1, Ordering::AcqRel);
            activity.touch();
            drop(permit);
        }));
    }
}

/// Takes `data_len` bytes of READ/WRITE budget: the connection's share first, then the
/// one shared by all connections (so one client never waits on the shared budget for
/// more than its own cap). `Some(None)`: no data, no budget; `None`: shutting down.
async fn take_budget(budgets: &Budgets, data_len: usize) -> Option<Option<Held>> {
    if data_len == 0 {
        return Some(None);
    }
    let units = u32::try_from(data_len.div_ceil(BUDGET_UNIT)).unwrap_or(u32::MAX);
    let own = Arc::clone(&budgets.conn)
        .acquire_many_owned(units)
        .await
        .ok()?;
    let shared = budgets.shared.sem.acquire_many(units).await.ok()?;
    // Given back by `Held`'s drop (the permit borrows the budget).
    shared.forget();
    budgets.shared.note_use();
    Some(Some(Held {
        _own: own,
        units,
        shared: Arc::clone(&budgets.shared),
    }))
}

/// Submits `io`; a discard or write-zeroes longer than the target's limit for it goes as
/// pieces of at most that limit (rounded down to the logical block size), all in flight
/// at once; the first error is the request's. NBD has no way to advertise such a limit
/// and qemu sends discards of up to 2 GiB, so the server splits them, as the kernel's
/// block layer does for ublk.
async fn submit_split<T: BlockTarget>(
    target: &T,
    info: &TargetInfo,
    queue: u16,
    io: BlockIo,
) -> Result<BlockReply, BlockError> {
    // `zeroes`: None for a discard, Some(may_unmap) for a write-zeroes.
    let (offset, len, fua, zeroes, limit) = match io {
        BlockIo::Discard { offset, len, fua } => (offset, len, fua, None, info.max_discard_bytes),
        BlockIo::WriteZeroes {
            offset,
            len,
            may_unmap,
            fua,
        } => (
            offset,
            len,
            fua,
            Some(may_unmap),
            info.max_write_zeroes_bytes,
        ),
        other => return target.submit(BlockRequest::new(queue, other)).await,
    };
    let make = |offset, len| match zeroes {
        None => BlockIo::Discard { offset, len, fua },
        Some(may_unmap) => BlockIo::WriteZeroes {
            offset,
            len,
            may_unmap,
            fua,
        },
    };
    let lbs = u64::from(info.logical_block_size.max(1));
    let piece = (limit / lbs * lbs).max(lbs);
    if len <= piece {
        return target
            .submit(BlockRequest::new(queue, make(offset, len)))
            .await;
    }
    let mut parts = Vec::new();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(piece);
        parts.push(target.submit(BlockRequest::new(queue, make(offset + done, n))));
        done += n;
    }
    for r in futures_util::future::join_all(parts).await {
        r?;
    }
    Ok(BlockReply::Done)
}

/// A request's share of both budgets, given back when it is dropped (reply sent or
/// request abandoned).
struct Held {
    _own: tokio::sync::OwnedSemaphorePermit,
    units: u32,
    shared: Arc<DataBudget>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared.sem.add_permits(self.units as usize);
        self.shared.trim_if_drained();
    }
}

fn read_error(e: io::Error, what: &str) -> ConnectionEnd {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ConnectionEnd::Protocol(format!("truncated {what}"))
    } else {
        ConnectionEnd::Io(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        s.parse().ok()
    }

    #[test]
    fn a_full_listener_gives_the_slot_of_the_longest_idle_connection() {
        let opts = NbdOptions {
            max_connections: 3,
            max_per_source: 2,
            idle_timeout: Duration::ZERO,
            ..NbdOptions::default()
        };
        let mut t = ConnTable::default();
        let a1 = t.admit(ip("10.0.0.1"), &opts).expect("room");
        let a2 = t.admit(ip("10.0.0.1"), &opts).expect("room");
        // The source is full: its idle connection (a2; a1 is busy) gives its slot.
        a1.busy.store(1, Ordering::Release);
        let a3 = t.admit(ip("10.0.0.1"), &opts).expect("a2 evicted");
        assert!(t.conns.contains_key(&a1.id) && t.conns.contains_key(&a3.id));
        assert!(!t.conns.contains_key(&a2.id));
        // Another source fills the listener; then everything busy: refused.
        let b1 = t.admit(ip("10.0.0.2"), &opts).expect("room");
        for a in [&a3, &b1] {
            a.busy.store(1, Ordering::Release);
        }
        let why = t.admit(ip("10.0.0.3"), &opts).err().expect("full and busy");
        assert!(why.contains("3 connections already open"), "{why}");
        // Unix sockets have no source limit, only the listener's.
        b1.busy.store(0, Ordering::Release);
        assert!(t.admit(None, &opts).is_ok());
        assert!(!t.conns.contains_key(&b1.id));
    }

    #[test]
    fn idle_but_not_long_enough_keeps_its_slot() {
        let opts = NbdOptions {
            max_connections: 1,
            idle_timeout: Duration::from_secs(3600),
            ..NbdOptions::default()
        };
        let mut t = ConnTable::default();
        let _a = t.admit(ip("10.0.0.1"), &opts).expect("room");
        let why = t.admit(ip("10.0.0.2"), &opts).err().expect("refused");
        assert!(why.contains("none idle for"), "{why}");
    }

    /// Records the requests it gets; fails a discard at `fail_at`.
    struct Recorder {
        info: TargetInfo,
        seen: std::sync::Mutex<Vec<(u16, String)>>,
        fail_at: u64,
    }

    impl BlockTarget for Recorder {
        fn info(&self) -> TargetInfo {
            self.info
        }

        async fn submit(&self, req: BlockRequest) -> Result<BlockReply, BlockError> {
            let fail = matches!(req.io, BlockIo::Discard { offset, .. } if offset == self.fail_at);
            let what = match req.io {
                BlockIo::Discard { offset, len, fua } => format!("D {offset}+{len} {fua}"),
                BlockIo::WriteZeroes {
                    offset,
                    len,
                    may_unmap,
                    fua,
                } => format!("Z {offset}+{len} {may_unmap} {fua}"),
                BlockIo::Read { offset, buf } => format!("R {offset}+{}", buf.len()),
                other => format!("{other:?}"),
            };
            lock(&self.seen).push((req.queue, what));
            if fail {
                Err(BlockError::Io)
            } else {
                Ok(BlockReply::Done)
            }
        }
    }

    #[test]
    fn long_discards_and_write_zeroes_are_split_by_the_target_limits() {
        let mut info = TargetInfo::simple(1 << 30, true);
        info.logical_block_size = 4096;
        info.max_discard_bytes = 8192 + 100; // rounded down to the logical block
        info.max_write_zeroes_bytes = 12288;
        let t = Recorder {
            info,
            seen: std::sync::Mutex::new(Vec::new()),
            fail_at: u64::MAX,
        };
        let run = |io| {
            crate::frontend::tests::block_on(submit_split(&t, &info, 7, io), Duration::from_secs(5))
        };
        let discard = |offset, len| BlockIo::Discard {
            offset,
            len,
            fua: true,
        };
        assert!(run(discard(4096, 20480)).is_ok());
        assert!(run(discard(0, 8192)).is_ok());
        let zeroes = BlockIo::WriteZeroes {
            offset: 0,
            len: 20480,
            may_unmap: false,
            fua: false,
        };
        assert!(run(zeroes).is_ok());
        let read = BlockIo::Read {
            offset: 0,
            buf: AlignedBuf::new(4096).expect("buffer"),
        };
        assert!(run(read).is_ok());
        let seen = std::mem::take(&mut *lock(&t.seen));
        let want = [
            "D 4096+8192 true",
            "D 12288+8192 true",
            "D 20480+4096 true",
            "D 0+8192 true",
            "Z 0+12288 false false",
            "Z 12288+8192 false false",
            "R 0+4096",
        ];
        assert_eq!(seen.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(), want);
        assert!(seen.iter().all(|s| s.0 == 7), "{seen:?}");
        // One failed piece fails the request.
        let t = Recorder {
            fail_at: 12288,
            ..t
        };
        let r = crate::frontend::tests::block_on(
            submit_split(&t, &info, 0, discard(4096, 20480)),
            Duration::from_secs(5),
        );
        assert_eq!(r.err(), Some(BlockError::Io));
        assert_eq!(lock(&t.seen).len(), 3, "every piece was still submitted");
    }

    #[test]
    fn the_budget_holds_at_least_one_largest_request() {
        assert_eq!(DataBudget::new(1).bytes(), proto::MAX_BLOCK as usize);
        assert_eq!(DataBudget::new(256 << 20).bytes(), 256 << 20);
    }
}
