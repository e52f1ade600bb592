//! Errors of the packet codec. Every message names the packet and says what was wrong, so a
//! protocol error in a log is actionable without a packet capture.

use std::fmt;

use super::command::Command;
use super::header::HeaderKind;

/// An accepted payload length, for [`WireError::PayloadSize`] messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Exactly this many bytes.
    Exactly(u64),
    /// An inclusive range.
    Between(u64, u64),
    /// At least this many bytes.
    AtLeast(u64),
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exactly(n) => write!(f, "{n}"),
            Self::Between(a, b) => write!(f, "{a}..={b}"),
            Self::AtLeast(n) => write!(f, "at least {n}"),
        }
    }
}

/// Why bytes could not be decoded, or a packet could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than the structure being read.
    #[error("{what} needs {need} bytes, got {have}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The first bytes are no DRBD header magic of the expected size.
    #[error(
        "bad header magic: first bytes {found:#010x} are not a {expected} (agreed protocol \
         {version})"
    )]
    BadMagic {
        /// The first four bytes, big-endian.
        found: u32,
        /// Which header(s) were acceptable.
        expected: &'static str,
        /// The agreed protocol version (80 before the feature exchange).
        version: u32,
    },
    /// A known header kind that the agreed protocol version does not allow.
    #[error("{kind} is not allowed at agreed protocol {version}")]
    HeaderNotAllowed {
        /// The header found.
        kind: HeaderKind,
        /// The agreed protocol version.
        version: u32,
    },
    /// `p_header100.pad` is not zero (DRBD rejects this with -EINVAL).
    #[error("p_header100 pad is {0:#010x}, must be 0")]
    HeaderPad(u32),
    /// The command value is not in DRBD's `enum drbd_packet`.
    #[error("unknown DRBD command {0:#06x}")]
    UnknownCommand(u16),
    /// A known command that a DRBD 8.4 peer never sends on the wire (DRBD 9 only,
    /// reserved or obsolete); 8.4 treats it as a protocol error, and so do we.
    #[error("{cmd} ({value:#06x}) is not part of the DRBD 8.4 protocol: {why}")]
    Unsupported {
        /// The command.
        cmd: Command,
        /// Its value.
        value: u16,
        /// Why it is not accepted.
        why: &'static str,
    },
    /// The payload length does not fit the command's layout.
    #[error("{cmd} payload is {got} bytes, expected {expected}")]
    PayloadSize {
        /// The command.
        cmd: Command,
        /// Length from the header.
        got: u64,
        /// What the layout allows.
        expected: Expected,
    },
    /// The data part of a data packet (P_DATA …, P_WSAME) has a bad length.
    #[error("{cmd} carries {got} data bytes, expected a multiple of 512 in {min}..={max}")]
    DataLength {
        /// The command.
        cmd: Command,
        /// Data bytes after the sub-header.
        got: u64,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// The caller passed a head slice of the wrong length to `decode`.
    #[error("{cmd}: decode was given {got} head bytes, the header says {expected}")]
    HeadLength {
        /// The command.
        cmd: Command,
        /// Bytes passed.
        got: usize,
        /// Bytes the layout says.
        expected: usize,
    },
    /// A numeric field violates the packet's rules.
    #[error("{cmd}: {field} is {value}, {problem}")]
    BadField {
        /// The command.
        cmd: Command,
        /// The field name as in DRBD's struct.
        field: &'static str,
        /// The value found.
        value: u64,
        /// What rule it breaks.
        problem: &'static str,
    },
    /// A string field is malformed.
    #[error("{cmd}: {field} {problem}")]
    BadString {
        /// The command.
        cmd: Command,
        /// The field name as in DRBD's struct.
        field: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// An algorithm name given to [`super::AlgName::new`] is not valid.
    #[error("algorithm name {0:?} is not 0..=63 printable ASCII characters")]
    BadAlgName(String),
    /// A packet cannot be encoded in this context.
    #[error("cannot encode {cmd}: {problem}")]
    Encode {
        /// The command.
        cmd: Command,
        /// Why not.
        problem: String,
    },
    /// A [`super::WireCtx`] was asked for with impossible parameters.
    #[error("invalid wire context: {0}")]
    BadContext(String),
    /// The feature exchange found no common protocol version.
    #[error(
        "no common protocol version: ours {our_min}..={our_max}, peer's {peer_min}..={peer_max}"
    )]
    NoCommonVersion {
        /// Our minimum.
        our_min: u32,
        /// Our maximum.
        our_max: u32,
        /// The peer's minimum.
        peer_min: u32,
        /// The peer's maximum (after the `0 means min` rule).
        peer_max: u32,
    },
}
