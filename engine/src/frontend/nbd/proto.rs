//! The NBD wire codec: pure functions and a sans-IO handshake machine, no sockets.
//!
//! Owns every byte layout of the fixed-newstyle NBD protocol that tandem speaks (the
//! canonical spec is NBD's `doc/proto.md`): the server greeting, option haggling
//! ([`Handshake`]), the 28-byte request header ([`parse_request`]), what the server does
//! with each request ([`classify`]) and the 16-byte simple reply ([`simple_reply`]).
//! Keeping it free of IO lets the fuzz body (`crate::fuzz::nbd`) and unit tests drive
//! exactly the code the server runs.
//!
//! Input is hostile. Bounds: option data ≤ [`MAX_OPTION_DATA`] bytes (an export name is at
//! most 4096 bytes by the spec, plus the `NBD_OPT_GO` framing and info requests); at most
//! [`MAX_OPTIONS`] options per handshake; READ/WRITE payloads ≤ [`MAX_BLOCK`] (32 MiB)
//! and ≤ the target's `max_io_bytes`. What is advertised comes from the target's
//! [`TargetInfo`] ([`block_sizes`], [`transmission_flags`]); requests are checked against
//! it (alignment to its logical block size, 512 or 4096). TRIM and WRITE_ZEROES carry no
//! payload, so their length is only bounded by the export (qemu sends discards of up to
//! 2 GiB; the server splits them by the target's limits). Only simple replies are spoken:
//! structured replies, meta contexts, TLS and extended headers are answered
//! `NBD_REP_ERR_UNSUP`.

use crate::frontend::{BlockError, TargetInfo};
use crate::store::MAX_BUF_LEN;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second greeting word and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: writes are refused.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is understood.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is understood.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is understood.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is understood.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: flush and FUA are visible across all connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose an export and start transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS (not supported).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and start transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies (not supported).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information.
pub const REP_INFO: u32 = 3;
/// Option reply error: unknown option.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// Option reply error: malformed option.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

/// Info type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Info type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info type: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (carries a payload).
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard.
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not deallocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// NBD error value: operation not permitted (read-only export).
pub const NBD_EPERM: u32 = 1;
/// NBD error value: I/O error.
pub const NBD_EIO: u32 = 5;
/// NBD error value: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// NBD error value: no space left (write beyond the end, thin pool full).
pub const NBD_ENOSPC: u32 = 28;
/// NBD error value: the server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE payload the server handles whatever the target says, bytes (32 MiB,
/// the largest `AlignedBuf`): a WRITE up to this is skipped when refused, a longer one
/// closes the connection.
pub const MAX_BLOCK: u32 = 32 << 20;
const _: () = assert!(MAX_BLOCK as usize == MAX_BUF_LEN);

/// What `NBD_INFO_BLOCK_SIZE` advertises for a target: minimum = its logical block size
/// (512 or 4096; offsets and lengths must be multiples of it), preferred = its physical
/// block size, maximum = its largest READ/WRITE (≤ [`MAX_BLOCK`]), rounded down to a
/// multiple of the minimum and never below the preferred size.
pub fn block_sizes(info: &TargetInfo) -> (u32, u32, u32) {
    let min = info.logical_block_size.max(512);
    let preferred = info.physical_block_size.max(min);
    let max = info.max_io_bytes.min(MAX_BLOCK) / min * min;
    (min, preferred.min(max.max(min)), max.max(min))
}

/// Longest export name the spec allows, bytes.
pub const MAX_NAME_LEN: usize = 4096;
/// Largest option data accepted, bytes: a 4096-byte name plus GO framing and up to
/// 2042 info requests. Longer options end the connection (the data is not skipped).
pub const MAX_OPTION_DATA: u32 = 8192;
/// Most options accepted in one handshake (real clients send fewer than 10).
pub const MAX_OPTIONS: u32 = 64;
/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const REPLY_LEN: usize = 16;

/// The server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags FIXED_NEWSTYLE|NO_ZEROES.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// The transmission flags for a target: multi-conn always (the target's flush is a
/// barrier over every connection), flush when it has a volatile cache, FUA when it
/// supports FUA, trim and write-zeroes when their limits are not 0, read-only when it is
/// not writable.
pub fn transmission_flags(info: &TargetInfo) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_CAN_MULTI_CONN;
    if info.volatile_cache {
        f |= TFLAG_SEND_FLUSH;
    }
    if info.fua {
        f |= TFLAG_SEND_FUA;
    }
    if info.max_discard_bytes > 0 {
        f |= TFLAG_SEND_TRIM;
    }
    if info.max_write_zeroes_bytes > 0 {
        f |= TFLAG_SEND_WRITE_ZEROES;
    }
    if !info.writable {
        f |= TFLAG_READ_ONLY;
    }
    f
}

/// Appends one option reply (header and data) to `out`.
///
/// `data` is at most a few KiB (names and messages are bounded by the caller), so its
/// length always fits the u32 field; a longer slice is truncated to what fits.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data.get(..len as usize).unwrap_or(data));
}

/// What is exported: the names a client may ask for and the target's properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The canonical export name (listed by `NBD_OPT_LIST`); the empty name, the
    /// spec's "default export", is accepted too.
    pub name: String,
    /// Sent as `NBD_INFO_DESCRIPTION` when asked for and not empty.
    pub description: String,
    /// Size and capabilities, read from the target at this handshake.
    pub info: TargetInfo,
}

impl Export {
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// Why a handshake ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The client set flags the server does not know (the spec requires a disconnect).
    #[error("unknown client flags {0:#x}")]
    BadClientFlags(u32),
    /// The client does not speak fixed newstyle.
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE (flags {0:#x})")]
    NotFixedNewstyle(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// An option's data is longer than [`MAX_OPTION_DATA`].
    #[error("option {option} carries {len} bytes of data (limit {MAX_OPTION_DATA})")]
    OptionTooLong {
        /// The option code.
        option: u32,
        /// The announced data length.
        len: u32,
    },
    /// More than [`MAX_OPTIONS`] options.
    #[error("more than {MAX_OPTIONS} options in one handshake")]
    TooManyOptions,
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (no error reply exists).
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    /// `feed` got a different number of bytes than `wants` asked for (a caller bug).
    #[error("handshake fed {got} bytes, wanted {wanted}")]
    WrongFeed {
        /// What `wants` returned.
        wanted: usize,
        /// What `feed` got.
        got: usize,
    },
    /// `feed` was called after the handshake ended.
    #[error("handshake already finished")]
    Finished,
}

/// What the handshake wants next, after `feed` returned successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read [`Handshake::wants`] more bytes and feed them.
    Continue,
    /// Option haggling is over: the transmission phase starts with the next byte.
    Transmit,
    /// The client sent `NBD_OPT_ABORT`; close after writing the output.
    Abort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, len: u32 },
    Done,
}

/// The server side of option haggling as a sans-IO machine.
///
/// The driver writes [`greeting`], then repeatedly reads exactly [`Handshake::wants`]
/// bytes, passes them to [`Handshake::feed`] and writes whatever `feed` appended to `out`
/// (also when `feed` fails, so a final reply is not lost), until `feed` returns
/// [`Step::Transmit`] or [`Step::Abort`] or an error (then the connection is closed).
#[derive(Debug)]
pub struct Handshake {
    export: Export,
    state: State,
    no_zeroes: bool,
    options: u32,
}

impl Handshake {
    /// A handshake offering `export`; the greeting is assumed sent.
    pub fn new(export: Export) -> Self {
        Self {
            export,
            state: State::ClientFlags,
            no_zeroes: false,
            options: 0,
        }
    }

    /// How many bytes the next `feed` needs (0 once the handshake is over).
    pub fn wants(&self) -> usize {
        match self.state {
            State::ClientFlags => 4,
            State::OptionHeader => 16,
            State::OptionData { len, .. } => len as usize,
            State::Done => 0,
        }
    }

    /// Feeds exactly [`Handshake::wants`] bytes; appends the server's answer to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Step, HandshakeError> {
        let wanted = self.wants();
        if self.state == State::Done {
            return Err(HandshakeError::Finished);
        }
        if input.len() != wanted {
            return Err(HandshakeError::WrongFeed {
                wanted,
                got: input.len(),
            });
        }
        let result = self.step(input, out);
        if !matches!(result, Ok(Step::Continue)) {
            self.state = State::Done;
        }
        result
    }

    fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Step, HandshakeError> {
        match self.state {
            State::ClientFlags => {
                let flags = be_u32(input, 0);
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    return Err(HandshakeError::BadClientFlags(flags));
                }
                if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
                    return Err(HandshakeError::NotFixedNewstyle(flags));
                }
                self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                self.state = State::OptionHeader;
                Ok(Step::Continue)
            }
            State::OptionHeader => {
                let magic = be_u64(input, 0);
                if magic != IHAVEOPT {
                    return Err(HandshakeError::BadOptionMagic(magic));
                }
                self.options += 1;
                if self.options > MAX_OPTIONS {
                    return Err(HandshakeError::TooManyOptions);
                }
                let option = be_u32(input, 8);
                let len = be_u32(input, 12);
                if len > MAX_OPTION_DATA {
                    return Err(HandshakeError::OptionTooLong { option, len });
                }
                if len == 0 {
                    self.state = State::OptionHeader;
                    self.option(option, &[], out)
                } else {
                    self.state = State::OptionData { option, len };
                    Ok(Step::Continue)
                }
            }
            State::OptionData { option, .. } => {
                self.state = State::OptionHeader;
                self.option(option, input, out)
            }
            State::Done => Err(HandshakeError::Finished),
        }
    }

    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Step, HandshakeError> {
        match option {
            OPT_EXPORT_NAME => {
                if !self.export.matches(data) {
                    let name = String::from_utf8_lossy(data.get(..256).unwrap_or(data));
                    return Err(HandshakeError::UnknownExport(name.into_owned()));
                }
                out.extend_from_slice(&self.export.info.size_bytes.to_be_bytes());
                out.extend_from_slice(&transmission_flags(&self.export.info).to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Ok(Step::Transmit)
            }
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Ok(Step::Abort)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(out, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return Ok(Step::Continue);
                }
                let name = self.export.name.as_bytes();
                let name = name.get(..MAX_NAME_LEN).unwrap_or(name);
                let mut entry = Vec::with_capacity(4 + name.len());
                entry.extend_from_slice(&u32_len(name).to_be_bytes());
                entry.extend_from_slice(name);
                option_reply(out, option, REP_SERVER, &entry);
                option_reply(out, option, REP_ACK, &[]);
                Ok(Step::Continue)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, out),
            _ => {
                // STARTTLS, STRUCTURED_REPLY, meta contexts, extended headers and anything
                // unknown: tandem speaks plain simple replies only.
                option_reply(
                    out,
                    option,
                    REP_ERR_UNSUP,
                    b"option not supported by tandem",
                );
                Ok(Step::Continue)
            }
        }
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Step, HandshakeError> {
        let Some(request) = parse_info_request(data) else {
            option_reply(
                out,
                option,
                REP_ERR_INVALID,
                b"malformed NBD_OPT_INFO/GO data",
            );
            return Ok(Step::Continue);
        };
        if !self.export.matches(request.name) {
            option_reply(out, option, REP_ERR_UNKNOWN, b"no such export");
            return Ok(Step::Continue);
        }
        let info = &self.export.info;
        let mut buf = [0u8; 14];
        buf[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        buf[2..10].copy_from_slice(&info.size_bytes.to_be_bytes());
        buf[10..12].copy_from_slice(&transmission_flags(info).to_be_bytes());
        option_reply(out, option, REP_INFO, &buf[..12]);
        // Block sizes always: the target needs its alignment whatever the client asked.
        let (min, preferred, max) = block_sizes(info);
        buf[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        buf[2..6].copy_from_slice(&min.to_be_bytes());
        buf[6..10].copy_from_slice(&preferred.to_be_bytes());
        buf[10..14].copy_from_slice(&max.to_be_bytes());
        option_reply(out, option, REP_INFO, &buf);
        let (mut sent_name, mut sent_description) = (false, false);
        for kind in request.infos() {
            let text = match kind {
                INFO_NAME if !sent_name => {
                    sent_name = true;
                    &self.export.name
                }
                INFO_DESCRIPTION if !sent_description && !self.export.description.is_empty() => {
                    sent_description = true;
                    &self.export.description
                }
                _ => continue,
            };
            let text = text.as_bytes();
            let text = text.get(..MAX_NAME_LEN).unwrap_or(text);
            let mut reply = Vec::with_capacity(2 + text.len());
            reply.extend_from_slice(&kind.to_be_bytes());
            reply.extend_from_slice(text);
            option_reply(out, option, REP_INFO, &reply);
        }
        option_reply(out, option, REP_ACK, &[]);
        Ok(if option == OPT_GO {
            Step::Transmit
        } else {
            Step::Continue
        })
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: a name and a list of info requests.
struct InfoRequest<'a> {
    name: &'a [u8],
    infos: &'a [u8],
}

impl InfoRequest<'_> {
    fn infos(&self) -> impl Iterator<Item = u16> + '_ {
        self.infos
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
    }
}

/// Parses `u32 name length, name, u16 count, count × u16`; None if the lengths disagree.
fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let name_len = usize::try_from(u32::from_be_bytes(data.get(0..4)?.try_into().ok()?)).ok()?;
    if name_len > MAX_NAME_LEN {
        return None;
    }
    let name_end = 4usize.checked_add(name_len)?;
    let name = data.get(4..name_end)?;
    let count_end = name_end.checked_add(2)?;
    let count = u16::from_be_bytes(data.get(name_end..count_end)?.try_into().ok()?);
    let infos = data.get(count_end..)?;
    if infos.len() != usize::from(count) * 2 {
        return None;
    }
    Some(InfoRequest { name, infos })
}

/// A decoded request header (the payload of a WRITE follows it on the stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// Opaque client cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

/// A request header that cannot be decoded: the stream is out of sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadRequestMagic(pub u32);

/// Decodes a request header.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, BadRequestMagic> {
    let magic = be_u32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(BadRequestMagic(magic));
    }
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: be_u64(b, 8),
        offset: be_u64(b, 16),
        len: be_u32(b, 24),
    })
}

/// What the server does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read `len` bytes at `offset` (aligned, inside the export, ≤ the maximum block).
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
    },
    /// Read `len` payload bytes from the stream and write them at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload length.
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Discard (of any length inside the export: the server splits one over the
    /// target's `max_discard_bytes`).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Write zeroes (split like a discard, by `max_write_zeroes_bytes`).
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// False when the client set `NBD_CMD_FLAG_NO_HOLE`.
        may_unmap: bool,
        /// Force unit access.
        fua: bool,
    },
    /// `NBD_CMD_DISC`: finish what is in flight, then close.
    Disconnect,
    /// Skip `skip` payload bytes (a refused WRITE), then reply with error `errno`.
    Refuse {
        /// NBD error value.
        errno: u32,
        /// Payload bytes to read and discard first (≤ 32 MiB).
        skip: u32,
        /// Why, for the log.
        why: &'static str,
    },
    /// The stream cannot be kept in sync (a WRITE payload too large to skip): close.
    Close {
        /// Why, for the log.
        why: &'static str,
    },
}

/// Decides what to do with a request against an export of `info`.
///
/// Offsets and lengths must be multiples of the target's logical block size (the
/// advertised minimum block size), non-zero and inside the export (`EINVAL`; `ENOSPC` for
/// writes past the end, as the spec asks); READ and WRITE at most the advertised maximum
/// block size (a WRITE over [`MAX_BLOCK`] closes the connection: its payload is not
/// skipped). Flags other than FUA (any command) and NO_HOLE (WRITE_ZEROES) get `EINVAL`,
/// and so do commands and flags the export does not advertise (FLUSH without a volatile
/// cache, FUA, TRIM, WRITE_ZEROES).
pub fn classify(req: &Request, info: &TargetInfo) -> Action {
    let refuse = |errno, why| Action::Refuse {
        errno,
        skip: 0,
        why,
    };
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let extra_flags = if info.fua {
        req.flags & !CMD_FLAG_FUA
    } else {
        req.flags
    };
    let (_, _, max_block) = block_sizes(info);
    match req.kind {
        CMD_READ => {
            if extra_flags != 0 {
                return refuse(NBD_EINVAL, "unsupported flags on READ");
            }
            if req.len > max_block {
                return refuse(NBD_EINVAL, "READ longer than the maximum block size");
            }
            match check_range(req, info, NBD_EINVAL) {
                Ok(()) => Action::Read {
                    offset: req.offset,
                    len: req.len,
                },
                Err((errno, why)) => refuse(errno, why),
            }
        }
        CMD_WRITE => classify_write(req, info, extra_flags, fua, max_block),
        CMD_DISC => Action::Disconnect,
        CMD_FLUSH => {
            if extra_flags != 0 {
                return refuse(NBD_EINVAL, "unsupported flags on FLUSH");
            }
            if !info.volatile_cache {
                return refuse(NBD_EINVAL, "FLUSH not advertised");
            }
            Action::Flush
        }
        CMD_TRIM => {
            if extra_flags != 0 {
                return refuse(NBD_EINVAL, "unsupported flags on TRIM");
            }
            if info.max_discard_bytes == 0 {
                return refuse(NBD_EINVAL, "TRIM not advertised");
            }
            if !info.writable {
                return refuse(NBD_EPERM, "TRIM on a read-only export");
            }
            match check_range(req, info, NBD_EINVAL) {
                Ok(()) => Action::Trim {
                    offset: req.offset,
                    len: req.len,
                    fua,
                },
                Err((errno, why)) => refuse(errno, why),
            }
        }
        CMD_WRITE_ZEROES => {
            if extra_flags & !CMD_FLAG_NO_HOLE != 0 {
                return refuse(NBD_EINVAL, "unsupported flags on WRITE_ZEROES");
            }
            if info.max_write_zeroes_bytes == 0 {
                return refuse(NBD_EINVAL, "WRITE_ZEROES not advertised");
            }
            if !info.writable {
                return refuse(NBD_EPERM, "WRITE_ZEROES on a read-only export");
            }
            match check_range(req, info, NBD_ENOSPC) {
                Ok(()) => Action::WriteZeroes {
                    offset: req.offset,
                    len: req.len,
                    may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                    fua,
                },
                Err((errno, why)) => refuse(errno, why),
            }
        }
        _ => refuse(NBD_EINVAL, "unsupported command"),
    }
}

/// [`classify`] of a WRITE: a payload over [`MAX_BLOCK`] closes the connection; any
/// other refusal skips the payload.
fn classify_write(
    req: &Request,
    info: &TargetInfo,
    extra_flags: u16,
    fua: bool,
    max_block: u32,
) -> Action {
    if req.len > MAX_BLOCK {
        return Action::Close {
            why: "WRITE payload longer than 32 MiB",
        };
    }
    let skip = |errno, why| Action::Refuse {
        errno,
        skip: req.len,
        why,
    };
    if extra_flags != 0 {
        return skip(NBD_EINVAL, "unsupported flags on WRITE");
    }
    if req.len > max_block {
        return skip(NBD_EINVAL, "WRITE longer than the maximum block size");
    }
    if !info.writable {
        return skip(NBD_EPERM, "WRITE to a read-only export");
    }
    match check_range(req, info, NBD_ENOSPC) {
        Ok(()) => Action::Write {
            offset: req.offset,
            len: req.len,
            fua,
        },
        Err((errno, why)) => skip(errno, why),
    }
}

/// Alignment, non-zero length and bounds; `past_end` is the errno for a range past the end.
fn check_range(req: &Request, info: &TargetInfo, past_end: u32) -> Result<(), (u32, &'static str)> {
    if req.len == 0 {
        return Err((NBD_EINVAL, "zero-length request"));
    }
    let min = u64::from(block_sizes(info).0);
    if !req.offset.is_multiple_of(min) || !u64::from(req.len).is_multiple_of(min) {
        return Err((
            NBD_EINVAL,
            "offset or length not a multiple of the minimum block size",
        ));
    }
    match req.offset.checked_add(u64::from(req.len)) {
        Some(end) if end <= info.size_bytes => Ok(()),
        _ => Err((past_end, "request extends past the end of the export")),
    }
}

/// Encodes a simple reply header (a successful READ's data follows it).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; REPLY_LEN] {
    let mut r = [0u8; REPLY_LEN];
    r[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&error.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r
}

/// The NBD error value for a target error. NBD has no EAGAIN, and the spec asks servers
/// not to send ENOMEM, so `Busy` (which the in-flight bound should make rare) is EIO.
pub fn nbd_error(e: BlockError) -> u32 {
    match e {
        BlockError::Io | BlockError::Busy => NBD_EIO,
        BlockError::Invalid => NBD_EINVAL,
        BlockError::ReadOnly => NBD_EPERM,
        BlockError::NoSpace => NBD_ENOSPC,
        BlockError::Shutdown => NBD_ESHUTDOWN,
    }
}

fn u32_len(b: &[u8]) -> u32 {
    u32::try_from(b.len()).unwrap_or(u32::MAX)
}

/// Big-endian u32 at `at`; 0 if out of range (callers pass fixed-size, checked buffers).
fn be_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

/// Big-endian u64 at `at`; 0 if out of range (callers pass fixed-size, checked buffers).
fn be_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn export(writable: bool) -> Export {
        Export {
            name: "vol0".into(),
            description: "tandem test".into(),
            info: TargetInfo::simple(SIZE, writable),
        }
    }

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&u32::try_from(data.len()).expect("small").to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut v = u32::try_from(name.len())
            .expect("small")
            .to_be_bytes()
            .to_vec();
        v.extend_from_slice(name);
        v.extend_from_slice(&u16::try_from(infos.len()).expect("small").to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    /// Drives a handshake over `input` as the server would; returns the output and the
    /// last result.
    fn drive(hs: &mut Handshake, input: &[u8]) -> (Vec<u8>, Result<Step, HandshakeError>) {
        let mut out = Vec::new();
        let mut rest = input;
        loop {
            let n = hs.wants();
            let Some((chunk, tail)) = rest.split_at_checked(n) else {
                return (out, Ok(Step::Continue));
            };
            rest = tail;
            match hs.feed(chunk, &mut out) {
                Ok(Step::Continue) => {}
                other => return (out, other),
            }
        }
    }

    fn rep(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        option_reply(&mut v, option, kind, data);
        v
    }

    #[test]
    fn greeting_golden() {
        assert_eq!(&greeting(), b"NBDMAGICIHAVEOPT\x00\x03");
    }

    #[test]
    fn option_reply_golden() {
        assert_eq!(
            rep(OPT_GO, REP_ACK, &[]),
            [0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]
        );
        let with_data = rep(OPT_LIST, REP_ERR_UNSUP, b"ab");
        assert_eq!(
            &with_data[8..],
            &[0, 0, 0, 3, 0x80, 0, 0, 1, 0, 0, 0, 2, b'a', b'b']
        );
    }

    #[test]
    fn transmission_flags_follow_target() {
        let rw = transmission_flags(&export(true).info);
        assert_eq!(rw, 0b1_0110_1101); // HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES MULTI_CONN
        let ro = transmission_flags(&export(false).info);
        assert_eq!(ro, rw | TFLAG_READ_ONLY);
        let mut no_discard = export(true).info;
        no_discard.max_discard_bytes = 0;
        no_discard.max_write_zeroes_bytes = 0;
        assert_eq!(transmission_flags(&no_discard), 0b1_0000_1101);
        let mut trim_only = export(true).info;
        trim_only.max_write_zeroes_bytes = 0;
        assert_eq!(transmission_flags(&trim_only), 0b1_0010_1101);
        let mut no_cache = export(true).info;
        no_cache.volatile_cache = false;
        no_cache.fua = false;
        assert_eq!(transmission_flags(&no_cache), 0b1_0110_0001);
    }

    #[test]
    fn block_sizes_follow_target() {
        let mut info = export(true).info;
        assert_eq!(block_sizes(&info), (512, 4096, 32 << 20));
        info.logical_block_size = 4096;
        info.physical_block_size = 4096;
        info.max_io_bytes = 1 << 20;
        assert_eq!(block_sizes(&info), (4096, 4096, 1 << 20));
        // A bigger limit than the server's buffers is capped; odd values are made sane.
        info.max_io_bytes = u32::MAX;
        info.physical_block_size = 512;
        assert_eq!(block_sizes(&info), (4096, 4096, MAX_BLOCK));
        info.max_io_bytes = 6000;
        assert_eq!(block_sizes(&info), (4096, 4096, 4096));
        // GO answers with them.
        let mut hs = Handshake::new(Export {
            info,
            ..export(true)
        });
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(OPT_GO, &go_data(b"vol0", &[])));
        let (out, step) = drive(&mut hs, &input);
        assert_eq!(step, Ok(Step::Transmit));
        let sizes = rep(
            OPT_GO,
            REP_INFO,
            &[0, 3, 0, 0, 0x10, 0, 0, 0, 0x10, 0, 0, 0, 0x10, 0],
        );
        assert!(out.windows(sizes.len()).any(|w| w == &sizes[..]));
    }

    #[test]
    fn requests_are_checked_against_the_target() {
        let refused = |a: Action| match a {
            Action::Refuse { errno, skip, .. } => (errno, skip),
            other => panic!("expected a refusal, got {other:?}"),
        };
        let mut info = export(true).info;
        info.logical_block_size = 4096;
        info.max_io_bytes = 1 << 20;
        // 512-aligned requests on a 4096-byte device: EINVAL before the target.
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_READ, 512, 4096)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_WRITE, 0, 512)),
            (NBD_EINVAL, 512)
        );
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_TRIM, 4096, 512)),
            (NBD_EINVAL, 0)
        );
        assert!(matches!(
            classify_raw(&info, 0, CMD_READ, 4096, 8192),
            Action::Read { .. }
        ));
        // Over the target's READ/WRITE limit: refused, the WRITE payload skipped.
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_READ, 0, 2 << 20)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_WRITE, 0, 2 << 20)),
            (NBD_EINVAL, 2 << 20)
        );
        // A discard over the target's limit is accepted (the server splits it).
        info.max_discard_bytes = 4096;
        assert!(matches!(
            classify_raw(&info, 0, CMD_TRIM, 0, 1 << 20),
            Action::Trim { len, .. } if len == 1 << 20
        ));
        // No volatile cache and no FUA: neither is accepted.
        info.volatile_cache = false;
        info.fua = false;
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_FLUSH, 0, 0)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            refused(classify_raw(&info, CMD_FLAG_FUA, CMD_WRITE, 0, 4096)),
            (NBD_EINVAL, 4096)
        );
    }

    #[test]
    fn go_golden_with_name_description_and_block_size() {
        let mut hs = Handshake::new(export(true));
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(
            OPT_GO,
            &go_data(b"vol0", &[INFO_NAME, INFO_DESCRIPTION, INFO_NAME]),
        ));
        let (out, step) = drive(&mut hs, &input);
        assert_eq!(step, Ok(Step::Transmit));
        let mut want = Vec::new();
        let mut export_info = INFO_EXPORT.to_be_bytes().to_vec();
        export_info.extend_from_slice(&SIZE.to_be_bytes());
        export_info.extend_from_slice(&0x016du16.to_be_bytes());
        want.extend(rep(OPT_GO, REP_INFO, &export_info));
        want.extend(rep(
            OPT_GO,
            REP_INFO,
            &[0, 3, 0, 0, 0x02, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0],
        ));
        want.extend(rep(OPT_GO, REP_INFO, b"\x00\x01vol0"));
        want.extend(rep(OPT_GO, REP_INFO, b"\x00\x02tandem test"));
        want.extend(rep(OPT_GO, REP_ACK, &[]));
        assert_eq!(out, want);
        assert_eq!(hs.wants(), 0);
        assert_eq!(hs.feed(&[], &mut Vec::new()), Err(HandshakeError::Finished));
    }

    #[test]
    fn info_then_unknown_then_default_go() {
        let mut hs = Handshake::new(export(false));
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_INFO, &go_data(b"nope", &[])));
        input.extend(option(OPT_INFO, &go_data(b"vol0", &[])));
        input.extend(option(OPT_GO, &go_data(b"", &[INFO_BLOCK_SIZE])));
        let (out, step) = drive(&mut hs, &input);
        assert_eq!(step, Ok(Step::Transmit));
        let unsup = rep(
            OPT_STRUCTURED_REPLY,
            REP_ERR_UNSUP,
            b"option not supported by tandem",
        );
        assert_eq!(&out[..unsup.len()], &unsup[..]);
        let unknown = rep(OPT_INFO, REP_ERR_UNKNOWN, b"no such export");
        assert_eq!(&out[unsup.len()..unsup.len() + unknown.len()], &unknown[..]);
        // Two full INFO answers (export, block size, ack) follow: INFO then GO.
        let acks = out
            .windows(20)
            .filter(|w| w[12..16] == REP_ACK.to_be_bytes() && w[16..20] == [0; 4])
            .count();
        assert_eq!(acks, 2);
    }

    #[test]
    fn export_name_replies_with_and_without_zeroes() {
        for (flags, zeroes) in [(1u32, 124usize), (3, 0)] {
            let mut hs = Handshake::new(export(true));
            let mut input = flags.to_be_bytes().to_vec();
            input.extend(option(OPT_EXPORT_NAME, b"vol0"));
            let (out, step) = drive(&mut hs, &input);
            assert_eq!(step, Ok(Step::Transmit));
            let mut want = SIZE.to_be_bytes().to_vec();
            want.extend_from_slice(&0x016du16.to_be_bytes());
            want.extend(std::iter::repeat_n(0u8, zeroes));
            assert_eq!(out, want);
        }
        let mut hs = Handshake::new(export(true));
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(OPT_EXPORT_NAME, b"other"));
        let (out, step) = drive(&mut hs, &input);
        assert!(out.is_empty());
        assert_eq!(step, Err(HandshakeError::UnknownExport("other".into())));
    }

    #[test]
    fn list_abort_and_invalid() {
        let mut hs = Handshake::new(export(true));
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(OPT_LIST, &[]));
        input.extend(option(OPT_LIST, b"x"));
        input.extend(option(OPT_GO, b"\x00\x00\x00\x09ab"));
        input.extend(option(OPT_GO, &[0, 0, 0, 0, 0, 2, 0, 1]));
        input.extend(option(OPT_ABORT, &[]));
        let (out, step) = drive(&mut hs, &input);
        assert_eq!(step, Ok(Step::Abort));
        let mut want = rep(OPT_LIST, REP_SERVER, b"\x00\x00\x00\x04vol0");
        want.extend(rep(OPT_LIST, REP_ACK, &[]));
        want.extend(rep(
            OPT_LIST,
            REP_ERR_INVALID,
            b"NBD_OPT_LIST takes no data",
        ));
        want.extend(rep(
            OPT_GO,
            REP_ERR_INVALID,
            b"malformed NBD_OPT_INFO/GO data",
        ));
        want.extend(rep(
            OPT_GO,
            REP_ERR_INVALID,
            b"malformed NBD_OPT_INFO/GO data",
        ));
        want.extend(rep(OPT_ABORT, REP_ACK, &[]));
        assert_eq!(out, want);
    }

    #[test]
    fn hostile_handshakes_end_the_connection() {
        let cases: Vec<(Vec<u8>, HandshakeError)> = vec![
            (vec![0, 0, 0, 7], HandshakeError::BadClientFlags(7)),
            (vec![0, 0, 0, 2], HandshakeError::NotFixedNewstyle(2)),
            (
                [&[0, 0, 0, 1][..], b"GARBAGE!\0\0\0\x07\0\0\0\0"].concat(),
                HandshakeError::BadOptionMagic(u64::from_be_bytes(*b"GARBAGE!")),
            ),
            (
                [
                    &[0, 0, 0, 1][..],
                    &IHAVEOPT.to_be_bytes(),
                    &[0, 0, 0, 7],
                    &(MAX_OPTION_DATA + 1).to_be_bytes(),
                ]
                .concat(),
                HandshakeError::OptionTooLong {
                    option: 7,
                    len: MAX_OPTION_DATA + 1,
                },
            ),
            (
                [
                    &[0, 0, 0, 1][..],
                    &option(99, b"x").repeat(MAX_OPTIONS as usize + 1),
                ]
                .concat(),
                HandshakeError::TooManyOptions,
            ),
        ];
        for (input, want) in cases {
            let mut hs = Handshake::new(export(true));
            let (_, step) = drive(&mut hs, &input);
            assert_eq!(step, Err(want));
            assert_eq!(hs.wants(), 0, "a failed handshake is over");
        }
        let mut hs = Handshake::new(export(true));
        assert_eq!(
            hs.feed(&[0, 0, 1], &mut Vec::new()),
            Err(HandshakeError::WrongFeed { wanted: 4, got: 3 })
        );
    }

    fn request(flags: u16, kind: u16, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn request_parse_golden() {
        let bytes = [
            0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0,
            0, 0x10, 0x00, 0x00, 0x00, 0x10, 0x00,
        ];
        let req = parse_request(&bytes).expect("valid");
        assert_eq!(
            req,
            Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                len: 4096
            }
        );
        let mut bad = bytes;
        bad[0] = 0;
        assert_eq!(parse_request(&bad), Err(BadRequestMagic(0x0060_9513)));
    }

    #[test]
    fn simple_reply_golden() {
        assert_eq!(
            simple_reply(NBD_EPERM, 0x0102_0304_0506_0708),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    fn classify_raw(info: &TargetInfo, flags: u16, kind: u16, offset: u64, len: u32) -> Action {
        classify(
            &parse_request(&request(flags, kind, offset, len)).expect("magic"),
            info,
        )
    }

    #[test]
    fn classify_valid_requests() {
        let info = export(true).info;
        assert_eq!(
            classify_raw(&info, CMD_FLAG_FUA, CMD_READ, 0, 512),
            Action::Read {
                offset: 0,
                len: 512
            }
        );
        assert_eq!(
            classify_raw(&info, CMD_FLAG_FUA, CMD_WRITE, SIZE - 4096, 4096),
            Action::Write {
                offset: SIZE - 4096,
                len: 4096,
                fua: true
            }
        );
        assert_eq!(classify_raw(&info, 0, CMD_FLUSH, 0, 0), Action::Flush);
        assert_eq!(classify_raw(&info, 0, CMD_DISC, 0, 0), Action::Disconnect);
        assert_eq!(
            classify_raw(&info, 0, CMD_TRIM, 0, 1 << 20),
            Action::Trim {
                offset: 0,
                len: 1 << 20,
                fua: false
            }
        );
        assert_eq!(
            classify_raw(&info, CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 512, 1024),
            Action::WriteZeroes {
                offset: 512,
                len: 1024,
                may_unmap: false,
                fua: false
            }
        );
        assert_eq!(
            classify_raw(&info, 0, CMD_WRITE_ZEROES, 512, 1024),
            Action::WriteZeroes {
                offset: 512,
                len: 1024,
                may_unmap: true,
                fua: false
            }
        );
    }

    #[test]
    fn classify_refusals() {
        let info = export(true).info;
        let ro = export(false).info;
        let refused = |a: Action| match a {
            Action::Refuse { errno, skip, .. } => (errno, skip),
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_READ, 1, 512)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_READ, 0, 0)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_READ, SIZE, 512)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_READ, u64::MAX - 511, 1024)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_READ, 0, MAX_BLOCK + 512)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            refused(classify_raw(&info, 4, CMD_READ, 0, 512)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_WRITE, 0, 100)),
            (NBD_EINVAL, 100)
        );
        assert_eq!(
            refused(classify_raw(&info, 0, CMD_WRITE, SIZE, 512)),
            (NBD_ENOSPC, 512)
        );
        assert_eq!(
            refused(classify_raw(&ro, 0, CMD_WRITE, 0, 512)),
            (NBD_EPERM, 512)
        );
        assert_eq!(
            refused(classify_raw(&ro, 0, CMD_TRIM, 0, 512)),
            (NBD_EPERM, 0)
        );
        assert_eq!(
            refused(classify_raw(&ro, 0, CMD_WRITE_ZEROES, 0, 512)),
            (NBD_EPERM, 0)
        );
        assert_eq!(
            refused(classify_raw(&info, CMD_FLAG_NO_HOLE, CMD_TRIM, 0, 512)),
            (NBD_EINVAL, 0)
        );
        assert_eq!(refused(classify_raw(&info, 0, 5, 0, 512)), (NBD_EINVAL, 0)); // CACHE
        assert_eq!(refused(classify_raw(&info, 0, 7, 0, 512)), (NBD_EINVAL, 0)); // BLOCK_STATUS
        assert_eq!(
            refused(classify_raw(&info, 0, 0xffff, 0, 512)),
            (NBD_EINVAL, 0)
        );
        let mut no_discard = info;
        no_discard.max_discard_bytes = 0;
        assert_eq!(
            refused(classify_raw(&no_discard, 0, CMD_TRIM, 0, 512)),
            (NBD_EINVAL, 0)
        );
        assert!(matches!(
            classify_raw(&info, 0, CMD_WRITE, 0, MAX_BLOCK + 1),
            Action::Close { .. }
        ));
    }

    #[test]
    fn block_errors_map_to_nbd_values() {
        assert_eq!(nbd_error(BlockError::ReadOnly), 1);
        assert_eq!(nbd_error(BlockError::Io), 5);
        assert_eq!(nbd_error(BlockError::Busy), 5);
        assert_eq!(nbd_error(BlockError::Invalid), 22);
        assert_eq!(nbd_error(BlockError::NoSpace), 28);
        assert_eq!(nbd_error(BlockError::Shutdown), 108);
    }
}
