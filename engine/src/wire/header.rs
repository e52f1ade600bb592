//! The three DRBD packet headers (all fields big-endian).
//!
//! - `p_header80` (size 8): u32 magic 0x83740267, u16 command, u16 length; used when agreed < 100
//!   (and before the feature exchange)
//! - `p_header95` (size 8): u16 magic 0x835a, u16 command, u32 length; used when agreed 95..=99,
//!   payload > 32 KiB
//! - `p_header100` (size 16): u32 magic 0x8620ec20, u16 volume, u16 command, u32 length, u32 pad =
//!   0; used when agreed ≥ 100
//!
//! `length` counts the payload bytes after the header.
//!
//! Which headers a receiver accepts: before the feature exchange only h80 (DRBD assumes
//! agreed 80 then). At agreed ≥ 100 only h100. Below 100, h80 always — 8.4's and DRBD 9's
//! own `prepare_header` send h80 for payloads ≤ 32 KiB at 95..=99, although DRBD 9's
//! `header_version_good` would refuse h80 there (that only matters for 8.3-era peers) —
//! and h95 only at 95..=99, the versions `prepare_header` uses it at. (8.4's
//! `decode_header` would take h95 at 86..=94 too; no sender produces that, and refusing
//! it keeps every accepted header re-encodable: an h80 cannot carry more than 65535.)

use std::fmt;

use super::command::Command;
use super::error::WireError;
use super::{WireCtx, DRBD_MAGIC, DRBD_MAGIC_100, DRBD_MAGIC_BIG, DRBD_MAX_SIZE_H80_PACKET};

/// Size of `p_header80`.
pub(crate) const H80_LEN: usize = 8;
/// Size of `p_header95`.
pub(crate) const H95_LEN: usize = 8;
/// Size of `p_header100`.
pub(crate) const H100_LEN: usize = 16;

// Field offsets; the last field ends exactly at the struct size.
const _: () = assert!(4 + 2 + 2 == H80_LEN);
const _: () = assert!(2 + 2 + 4 == H95_LEN);
const _: () = assert!(4 + 2 + 2 + 4 + 4 == H100_LEN);

/// Which header layout a packet uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeaderKind {
    /// `p_header80`.
    H80,
    /// `p_header95`.
    H95,
    /// `p_header100`.
    H100,
}

impl HeaderKind {
    /// Bytes on the wire.
    pub const fn size(self) -> usize {
        match self {
            Self::H80 => H80_LEN,
            Self::H95 => H95_LEN,
            Self::H100 => H100_LEN,
        }
    }

    /// Whether a receiver at `ctx` accepts this header (see the module doc).
    pub fn allowed(self, ctx: &WireCtx) -> bool {
        let v = ctx.version();
        match self {
            Self::H80 => v < 100,
            Self::H95 => (95..100).contains(&v),
            Self::H100 => v >= 100,
        }
    }
}

impl fmt::Display for HeaderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::H80 => "p_header80",
            Self::H95 => "p_header95",
            Self::H100 => "p_header100",
        })
    }
}

/// A decoded packet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The layout it was read from or will be written in.
    pub kind: HeaderKind,
    /// The command.
    pub command: Command,
    /// The volume number (h100 only; 0 for h80/h95). DRBD 9 sends 0xffff for
    /// connection-level packets, 8.4 sends 0.
    pub volume: u16,
    /// Payload bytes after the header.
    pub length: u32,
}

impl Header {
    /// Bytes of the header itself.
    pub const fn size(&self) -> usize {
        self.kind.size()
    }

    /// The header DRBD's `prepare_header` would write for a payload of `length` bytes:
    /// h100 at agreed ≥ 100; h95 only when agreed ≥ 95 and the payload exceeds 32 KiB;
    /// h80 otherwise.
    pub fn for_payload(
        command: Command,
        volume: u16,
        length: u32,
        ctx: &WireCtx,
    ) -> Result<Header, WireError> {
        let kind = if ctx.version() >= 100 {
            HeaderKind::H100
        } else if ctx.version() >= 95 && length > DRBD_MAX_SIZE_H80_PACKET {
            HeaderKind::H95
        } else {
            HeaderKind::H80
        };
        let h = Header {
            kind,
            command,
            volume,
            length,
        };
        h.check_encodable()?;
        Ok(h)
    }

    fn check_encodable(&self) -> Result<(), WireError> {
        let bad = |problem: String| WireError::Encode {
            cmd: self.command,
            problem,
        };
        if self.kind != HeaderKind::H100 && self.volume != 0 {
            return Err(bad(format!(
                "volume {} needs p_header100 (agreed protocol ≥ 100), not {}",
                self.volume, self.kind
            )));
        }
        if self.kind == HeaderKind::H80 && self.length > u32::from(u16::MAX) {
            return Err(bad(format!(
                "payload of {} bytes does not fit p_header80's 16-bit length",
                self.length
            )));
        }
        Ok(())
    }

    /// Appends the header's bytes. Fails if the volume or length cannot be expressed in
    /// this header kind.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.check_encodable()?;
        let cmd = self.command.value().to_be_bytes();
        match self.kind {
            HeaderKind::H80 => {
                let len = u16::try_from(self.length).map_err(|_| WireError::Encode {
                    cmd: self.command,
                    problem: "length overflows p_header80".into(),
                })?;
                out.extend_from_slice(&DRBD_MAGIC.to_be_bytes());
                out.extend_from_slice(&cmd);
                out.extend_from_slice(&len.to_be_bytes());
            }
            HeaderKind::H95 => {
                out.extend_from_slice(&DRBD_MAGIC_BIG.to_be_bytes());
                out.extend_from_slice(&cmd);
                out.extend_from_slice(&self.length.to_be_bytes());
            }
            HeaderKind::H100 => {
                out.extend_from_slice(&DRBD_MAGIC_100.to_be_bytes());
                out.extend_from_slice(&self.volume.to_be_bytes());
                out.extend_from_slice(&cmd);
                out.extend_from_slice(&self.length.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes());
            }
        }
        Ok(())
    }

    /// Decodes the header at the start of `buf`, which must hold at least
    /// [`WireCtx::header_len`] bytes (8, or 16 at agreed ≥ 100). Checks the magic, that the
    /// kind is allowed at `ctx`, the h100 pad, and that the command is known.
    pub fn decode(buf: &[u8], ctx: &WireCtx) -> Result<Header, WireError> {
        let need = ctx.header_len();
        let head = buf.get(..need).ok_or(WireError::Truncated {
            what: "packet header",
            have: buf.len(),
            need,
        })?;
        let first = be32(head, 0);
        let (kind, volume, cmd, length) = if need == H100_LEN {
            if first != DRBD_MAGIC_100 {
                return Err(bad_magic(first, ctx));
            }
            let pad = be32(head, 12);
            if pad != 0 {
                return Err(WireError::HeaderPad(pad));
            }
            (
                HeaderKind::H100,
                be16(head, 4),
                be16(head, 6),
                be32(head, 8),
            )
        } else if be16(head, 0) == DRBD_MAGIC_BIG {
            (HeaderKind::H95, 0, be16(head, 2), be32(head, 4))
        } else if first == DRBD_MAGIC {
            (HeaderKind::H80, 0, be16(head, 4), u32::from(be16(head, 6)))
        } else {
            return Err(bad_magic(first, ctx));
        };
        if !kind.allowed(ctx) {
            return Err(WireError::HeaderNotAllowed {
                kind,
                version: ctx.version(),
            });
        }
        Ok(Header {
            kind,
            command: Command::from_u16(cmd)?,
            volume,
            length,
        })
    }
}

fn bad_magic(found: u32, ctx: &WireCtx) -> WireError {
    WireError::BadMagic {
        found,
        expected: if ctx.version() >= 100 {
            "p_header100"
        } else if ctx.is_pre_features() {
            "p_header80"
        } else {
            "p_header80 or p_header95"
        },
        version: ctx.version(),
    }
}

/// Big-endian u16 at `off`; 0 if out of range (callers slice to the exact size first).
fn be16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

/// Big-endian u32 at `off`; 0 if out of range (callers slice to the exact size first).
fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}
