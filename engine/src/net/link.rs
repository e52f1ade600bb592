//! The transport seam: a live connection as one object that owns its streams.
//!
//! A [`Link`] is what the replica holds while connected. It owns one meta stream and a
//! *set* of data streams (one today, as DRBD 8.4 has one data socket), accepts packets
//! tagged with a [`Stream`] class, encodes them (the replica never builds bytes and never
//! names a socket) and queues them for the stream's sender task, and reports congestion
//! per class. Each queue holds at most `max-buffers` × 4 + 64 packets (see
//! `net::session`): more than the replica can have in flight, so a full queue is a bug
//! the caller answers by dropping the connection ([`SendError::Full`]), never by growing
//! the queue.
//!
//! The one rule that ties the replica to a single ordered data stream lives in
//! [`Link::queue_for`]: see its doc. Multi-stream work changes that function and the
//! peer-side reordering it implies, nothing else in the replica.

use crate::store::AlignedBuf;
use crate::wire::{self, Command, DataHeader, Packet, WireCtx};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Notify};

/// Which stream class a packet travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Application writes, barriers, state, read requests and replies.
    Data,
    /// Acks, barrier acks, state-change replies, pings: never queued behind data.
    Meta,
    /// Resync requests and replies (the resync's data rides here).
    Resync,
}

/// Bytes of an encoded header kept inline in [`Head`]: every packet the replica sends
/// through a link fits (a `P_DATA` header is 40 bytes with h100, `P_UUIDS` 64, a
/// checksum resync request 44 + its digest), so a packet costs no heap allocation.
const HEAD_INLINE: usize = 96;

/// An encoded header and fixed payload: inline up to [`HEAD_INLINE`] bytes, on the heap
/// beyond.
pub(crate) enum Head {
    Inline { buf: [u8; HEAD_INLINE], len: u8 },
    Heap(Vec<u8>),
}

impl Head {
    /// Encodes with `f` into a per-thread scratch buffer, then keeps the bytes inline
    /// when they fit (the scratch buffer's allocation is reused).
    fn encode(
        f: impl FnOnce(&mut Vec<u8>) -> Result<(), wire::WireError>,
    ) -> Result<Self, wire::WireError> {
        use std::cell::RefCell;
        thread_local! {
            static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|s| {
            let mut out = s.borrow_mut();
            out.clear();
            f(&mut out)?;
            Ok(Head::from(&out[..]))
        })
    }
}

impl From<&[u8]> for Head {
    fn from(bytes: &[u8]) -> Self {
        match u8::try_from(bytes.len()) {
            Ok(len) if bytes.len() <= HEAD_INLINE => {
                let mut buf = [0u8; HEAD_INLINE];
                buf[..bytes.len()].copy_from_slice(bytes);
                Head::Inline { buf, len }
            }
            _ => Head::Heap(bytes.to_vec()),
        }
    }
}

impl From<Vec<u8>> for Head {
    /// Inline when it fits, else the vector itself (no copy).
    fn from(bytes: Vec<u8>) -> Self {
        if bytes.len() <= HEAD_INLINE {
            Head::from(&bytes[..])
        } else {
            Head::Heap(bytes)
        }
    }
}

impl std::ops::Deref for Head {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Head::Inline { buf, len } => &buf[..usize::from(*len)],
            Head::Heap(v) => v,
        }
    }
}

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Head({} bytes)", self.len())
    }
}

/// A packet queued for a socket's sender task: encoded header (+ sub-header), optional
/// data that follows it, and the request to report as handed to the network (protocol A).
#[derive(Debug)]
pub(crate) struct Outgoing {
    /// Header and fixed payload.
    pub(crate) bytes: Head,
    /// Data bytes following the header (P_DATA), shared with the local write.
    pub(crate) data: Option<Arc<AlignedBuf>>,
    /// Request id to report once the packet is in the socket (protocol A completion).
    pub(crate) sent_id: Option<u64>,
    /// Fired once this packet (and so everything queued before it) is in the socket.
    pub(crate) written: Option<oneshot::Sender<()>>,
}

impl Outgoing {
    /// A packet without data or completion.
    pub(crate) fn bytes(bytes: &[u8]) -> Self {
        Outgoing {
            bytes: Head::from(bytes),
            data: None,
            sent_id: None,
            written: None,
        }
    }
}

/// Why a packet was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection's sender task is gone: the connection is ending.
    #[error("connection closed")]
    Closed,
    /// The stream's queue is full: a bound was miscomputed (drop the connection).
    #[error("send queue full")]
    Full,
    /// The codec refused the packet (a programmer error: the replica built it).
    #[error("cannot encode: {0}")]
    Encode(#[from] wire::WireError),
}

/// How the connection's watchdog (`net::liveness`) learns of what can bring a deadline
/// closer while it sleeps: a write that starts waiting for the peer when none did (the
/// link tells it) and a blocked sender (the sender tells it). One atomic load per write.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    /// The watchdog's last look saw no write waiting.
    idle: AtomicBool,
    /// Wakes the watchdog.
    pub(crate) wake: Notify,
}

impl Watch {
    /// Set to `true` before the watchdog looks, `false` when the look found a waiting
    /// write (its deadline is then known).
    pub(crate) fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::SeqCst);
    }

    /// A write was queued for the peer: wake the watchdog if it sleeps with none waiting.
    fn write_queued(&self) {
        if self.idle.load(Ordering::SeqCst) && self.idle.swap(false, Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }
}

/// The sending side of a live connection.
#[derive(Debug, Clone)]
pub struct Link {
    ctx: WireCtx,
    /// Never empty; exactly one today.
    data: Vec<mpsc::Sender<Outgoing>>,
    meta: mpsc::Sender<Outgoing>,
    session: u64,
    watch: Arc<Watch>,
}

impl Link {
    /// A link over one data and one meta queue for connection number `session`.
    pub(crate) fn new(
        ctx: WireCtx,
        data: mpsc::Sender<Outgoing>,
        meta: mpsc::Sender<Outgoing>,
        session: u64,
    ) -> Self {
        Link {
            ctx,
            data: vec![data],
            meta,
            session,
            watch: Arc::default(),
        }
    }

    /// What wakes this connection's watchdog (shared with it).
    pub(crate) fn watch(&self) -> Arc<Watch> {
        Arc::clone(&self.watch)
    }

    /// Agreed protocol version and features.
    pub fn ctx(&self) -> &WireCtx {
        &self.ctx
    }

    /// Connection number, so a late event of an old connection is ignored.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The queue a packet of `stream` goes to.
    ///
    /// **The one place that relies on one ordered data stream.** The Primary's epochs
    /// (`request/primary.rs`, module doc) are only correct if the peer sees every
    /// `P_DATA` of an epoch before that epoch's `P_BARRIER`, and a resync reply after
    /// the application write it must not overtake (DRBD 8.4's single data socket gives
    /// both). With several data streams this function must pin an epoch's writes and its
    /// barrier to one stream (or the peer must reorder by epoch number) — the change the
    /// multi-stream work makes here.
    fn queue_for(&self, stream: Stream) -> &mpsc::Sender<Outgoing> {
        match stream {
            Stream::Meta => &self.meta,
            Stream::Data | Stream::Resync => &self.data[0],
        }
    }

    fn push(&self, stream: Stream, out: Outgoing) -> Result<(), SendError> {
        self.queue_for(stream).try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            mpsc::error::TrySendError::Full(_) => SendError::Full,
        })
    }

    /// Encodes `pkt` and queues it (with `data` after it, if any) on `stream`.
    pub fn send(
        &self,
        stream: Stream,
        pkt: &Packet,
        data: Option<Arc<AlignedBuf>>,
    ) -> Result<(), SendError> {
        let bytes = Head::encode(|out| wire::encode(pkt, &self.ctx, 0, out))?;
        self.push(
            stream,
            Outgoing {
                bytes,
                data,
                sent_id: None,
                written: None,
            },
        )
    }

    /// Encodes `pkts` back to back and queues them on `stream` as one item (one slot of
    /// the queue however many they are: a SyncSource's `P_OUT_OF_SYNC` list, bounded by
    /// the blocks written during the bitmap exchange).
    pub fn send_all(&self, stream: Stream, pkts: &[Packet]) -> Result<(), SendError> {
        let mut out = Vec::new();
        for pkt in pkts {
            wire::encode(pkt, &self.ctx, 0, &mut out)?;
        }
        self.push(
            stream,
            Outgoing {
                bytes: Head::from(out),
                ..Outgoing::bytes(&[])
            },
        )
    }

    /// Resolves once every packet queued so far on the data and meta streams is in its
    /// socket, or the connection is gone. An empty marker rides behind them on each
    /// queue; the sender task fires it after the `writev` that carried what preceded
    /// it. Used before a connection is ended on purpose right after queueing a reply,
    /// so that ending it does not drop the reply.
    pub fn sent(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut markers = Vec::with_capacity(self.data.len() + 1);
        for q in self.data.iter().chain(std::iter::once(&self.meta)) {
            let (tx, rx) = oneshot::channel();
            let marker = Outgoing {
                written: Some(tx),
                ..Outgoing::bytes(&[])
            };
            if q.try_send(marker).is_ok() {
                markers.push(rx);
            }
        }
        async move {
            for m in markers {
                // An error: the sender task ended, so nothing more will be written.
                let _ = m.await;
            }
        }
    }

    /// Queues an application write: `P_DATA` with `len` bytes of `data` after it, or a
    /// `P_TRIM` / `P_ZEROES` when `data` is `None` (`zeroes` picks which, as the agreed
    /// features allow). `sent_id`: reported through `Replica::handed_to_network` once
    /// the packet is in the socket (protocol A).
    pub fn send_write(
        &self,
        head: DataHeader,
        len: u32,
        data: Option<Arc<AlignedBuf>>,
        zeroes: bool,
        sent_id: Option<u64>,
    ) -> Result<(), SendError> {
        let bytes = Head::encode(|out| {
            if data.is_some() {
                wire::encode_data_header(Command::P_DATA, &head, &[], len, &self.ctx, 0, out)
            } else {
                let cmd = if zeroes && self.ctx.has(wire::ff::DRBD_FF_WZEROES) {
                    Command::P_ZEROES
                } else {
                    Command::P_TRIM
                };
                let pkt = Packet::Trim {
                    cmd,
                    head,
                    size: len,
                };
                wire::encode(&pkt, &self.ctx, 0, out)
            }
        })?;
        self.push(
            Stream::Data,
            Outgoing {
                bytes,
                data,
                sent_id,
                written: None,
            },
        )?;
        self.watch.write_queued();
        Ok(())
    }

    /// Whether `stream`'s queue is more than half full (the resync controller's
    /// congestion input).
    pub fn congested(&self, stream: Stream) -> bool {
        let q = self.queue_for(stream);
        q.capacity() < q.max_capacity() / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn heads_stay_inline_up_to_their_limit() {
        let small = Head::from(&[7u8; HEAD_INLINE][..]);
        assert!(matches!(small, Head::Inline { .. }));
        assert_eq!(&small[..], &[7u8; HEAD_INLINE][..]);
        let big = Head::from(&[9u8; HEAD_INLINE + 1][..]);
        assert!(matches!(big, Head::Heap(_)));
        // From a vector: inline when small, the vector itself when not.
        assert!(matches!(
            Head::from(vec![1u8; 8]),
            Head::Inline { len: 8, .. }
        ));
        let v = vec![2u8; HEAD_INLINE + 1];
        let at = v.as_ptr();
        assert!(matches!(Head::from(v), Head::Heap(h) if h.as_ptr() == at));
        assert_eq!(big.len(), HEAD_INLINE + 1);
        // The largest packet a replica sends through a link is inline.
        let uuids = Packet::Uuids(wire::Uuids {
            current: 1,
            bitmap: 2,
            history: [3, 4],
            dirty_bits: 5,
            uuid_flags: 6,
        });
        let ctx = WireCtx::new(101, 0).expect("ctx");
        let h = Head::encode(|out| wire::encode(&uuids, &ctx, 0, out)).expect("encode");
        assert!(matches!(h, Head::Inline { .. }), "{h:?}");
    }

    /// The watchdog sleeping with no write waiting is woken by the first write queued,
    /// once; a watchdog that knows of a waiting write is not.
    #[tokio::test]
    async fn a_write_wakes_an_idle_watchdog_once() {
        let (dtx, _drx) = mpsc::channel(8);
        let (mtx, _mrx) = mpsc::channel(8);
        let link = Link::new(WireCtx::new(101, 0).expect("ctx"), dtx, mtx, 1);
        let watch = link.watch();
        let head = DataHeader {
            sector: 0,
            block_id: 1,
            seq_num: 0,
            dp_flags: 0,
        };
        let data = Arc::new(crate::store::AlignedBuf::new(4096).expect("buf"));
        let woken = || watch.wake.notified().now_or_never().is_some();
        watch.set_idle(false);
        link.send_write(head, 4096, Some(data.clone()), false, None)
            .expect("write");
        assert!(!woken(), "not idle: no wake");
        watch.set_idle(true);
        link.send_write(head, 4096, Some(data.clone()), false, None)
            .expect("write");
        link.send_write(head, 4096, Some(data), false, None)
            .expect("write");
        assert!(woken(), "the first write wakes the idle watchdog");
        assert!(!woken(), "only once");
    }

    #[test]
    fn packets_go_to_their_class_and_a_full_queue_is_reported() {
        let (dtx, mut drx) = mpsc::channel(2);
        let (mtx, mut mrx) = mpsc::channel(2);
        let link = Link::new(WireCtx::new(101, 0).expect("ctx"), dtx, mtx, 7);
        let ping = Packet::Empty(Command::P_PING);
        link.send(Stream::Meta, &ping, None).expect("meta");
        link.send(Stream::Resync, &ping, None).expect("resync");
        assert!(mrx.try_recv().is_ok());
        assert!(
            drx.try_recv().is_ok(),
            "resync shares the data stream today"
        );
        link.send(Stream::Data, &ping, None).expect("1");
        assert!(!link.congested(Stream::Data));
        link.send(Stream::Data, &ping, None).expect("2");
        assert!(link.congested(Stream::Data));
        assert!(matches!(
            link.send(Stream::Data, &ping, None),
            Err(SendError::Full)
        ));
        drop(drx);
        assert!(matches!(
            link.send(Stream::Data, &ping, None),
            Err(SendError::Closed)
        ));
    }
}
