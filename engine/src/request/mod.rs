//! The sans-IO write pipeline: what a Primary does with application writes and flushes
//! ([`Primary`]), and what a Secondary does with the writes its peer sends ([`Receiver`]).
//!
//! Both are plain state machines (docs/design.md §1, §3). They own no socket, file, clock,
//! thread or buffer: a driver calls a method for each event (a request from the frontend,
//! a local disk completion, a packet from the peer, a connection change) and then drains
//! the IO the core wants done (submit to the local disk, send to the peer, complete to the
//! application). Data buffers stay with the driver, keyed by the ids and tags that the
//! outputs carry. The seeded simulator (`crate::sim`) drives the same two machines
//! against faulty in-memory disks and networks, which is how their rules are tested.
//!
//! The rules (docs/drbd-reference.md §4) and where they live:
//!
//! - overlapping writes are serialised (interval set) — [`Primary::write`]
//! - epochs, lazy/at-close `P_BARRIER`, `max_epoch_size` (2048) — `primary.rs`
//! - completion: A = local + handed to TCP, B = + `P_RECV_ACK`, C = + `P_WRITE_ACK` — [`Primary`]
//! - `P_BARRIER_ACK` must match the oldest epoch and its size — [`Primary::barrier_ack`]
//! - flush = barrier + local flush + barrier acks up to it (peer flushed before acking) —
//!   [`Primary::flush`]
//! - disconnected writes and un-acked writes at connection loss become out of sync — [`OutOfSync`]
//! - the peer drains an epoch, then flushes, then acks the barrier — [`Receiver`]
//!
//! Everything is bounded at construction: in-flight requests, the transfer log of sent
//! but not barrier-acked writes, the Secondary's held queue and active local writes. The
//! output vector is drained by the driver after every call, so it holds at most what one
//! call produced (bounded by the in-flight limits).

mod bitmap;
mod primary;
mod receiver;

pub use bitmap::{OutOfSync, BLOCK_SIZE, PAGE_BITS, PAGE_BYTES};
pub use primary::{MetaConfig, Primary, PrimaryConfig, PrimaryOutput, PrimaryStats};
pub use receiver::{PeerWrite, Receiver, ReceiverConfig, ReceiverOutput, ReceiverStats};

#[cfg(test)]
pub(crate) use primary::PrimarySabotage;
#[cfg(test)]
pub(crate) use receiver::ReceiverSabotage;

/// Bytes per sector: offsets on the wire and in these APIs are 512-byte sectors.
pub const SECTOR: u32 = 512;

/// `dp_flags` bits (docs/drbd-reference.md §2.3); the core computes the set of agreed
/// protocol ≥ 100, where the ack type travels in the flags. The constants are the codec's:
/// the wire module is pure too, so the core depends on nothing with IO.
pub use crate::wire::dp;

/// What a write does to its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteKind {
    /// Write the request's data (`P_DATA`).
    Data,
    /// Discard the range (`P_TRIM`); reads of it return zeroes on thin devices.
    Discard,
    /// Zero the range (`P_ZEROES`); `unmap`: the range may be deallocated.
    Zeroes {
        /// The range may be deallocated (thin pools get the space back).
        unmap: bool,
    },
}

impl WriteKind {
    /// The `dp_flags` bits that say which kind this is.
    pub fn dp_flags(self) -> u32 {
        match self {
            WriteKind::Data => 0,
            WriteKind::Discard => dp::DP_DISCARD,
            WriteKind::Zeroes { unmap: true } => dp::DP_DISCARD | dp::DP_ZEROES,
            WriteKind::Zeroes { unmap: false } => dp::DP_ZEROES,
        }
    }

    /// True when the write carries a data payload.
    pub fn has_data(self) -> bool {
        matches!(self, WriteKind::Data)
    }
}

/// Why a request completed with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The local disk failed the write or flush.
    #[error("local I/O error")]
    IoFailed,
}

/// Why a core refused an input. The core's state is unchanged when it returns an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A bound is reached; retry after a completion (back-pressure, not a failure).
    #[error("too many requests in flight")]
    Busy,
    /// The driver or frontend broke the contract (bad range, unknown tag, duplicate
    /// event). A bug on this node: log it, fail the request.
    #[error("invalid input: {0}")]
    Invalid(&'static str),
    /// The peer broke the protocol (an ack for an unknown block, a barrier ack that does
    /// not match the oldest epoch). Drop the connection with this reason.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

/// Checks that `[sector, sector + len)` is a non-empty, sector-multiple range inside a
/// volume of `sectors` sectors. Returns the end sector.
pub(crate) fn check_range(sector: u64, len: u32, sectors: u64) -> Option<u64> {
    if len == 0 || !len.is_multiple_of(SECTOR) {
        return None;
    }
    let end = sector.checked_add(u64::from(len / SECTOR))?;
    (end <= sectors).then_some(end)
}

/// A slab handle: the slot index in the low 32 bits, the slot's generation in the high 32,
/// so a stale or forged handle is recognised instead of hitting a reused slot.
fn make_handle(idx: usize, gen: u32) -> u64 {
    // Slab sizes are bounded by configuration far below 2^32; `idx` fits.
    (u64::from(gen) << 32) | (idx as u64 & 0xffff_ffff)
}

/// Splits a handle into (slot index, generation).
fn split_handle(h: u64) -> (usize, u32) {
    let idx = usize::try_from(h & 0xffff_ffff).unwrap_or(usize::MAX);
    let gen = u32::try_from(h >> 32).unwrap_or(u32::MAX);
    (idx, gen)
}
