//! The bitmap exchange codec: DRBD's `P_BITMAP` / `P_COMPRESSED_BITMAP` stream that carries
//! one node's out-of-sync bitmap to its peer after the sync handshake, encoded and decoded
//! exactly as DRBD 8.4 does (`drbd_vli.h`; `fill_bitmap_rle_bits`,
//! `send_bitmap_rle_or_plain` in `drbd_main.c`; `recv_bm_rle_bits`, `receive_bitmap_plain`,
//! `receive_bitmap` in `drbd_receiver.c`). Pure: no IO, no allocation beyond the caller's
//! payload buffer; never panics and never writes outside the caller's bitmap on any input
//! (fuzzed by [`crate::fuzz::bitmap`]).
//!
//! What it owns, with the numbers:
//! - The bitmap: bit `i` (bit `i % 64` of little-endian word `i / 64`) is 4 KiB block `i`,
//!   1 = out of sync. `bm_bits` valid bits in `⌈bm_bits / 64⌉` words, at most
//!   [`MAX_BM_BITS`] (2^56, so every run length fits the VLI code; 2^56 × 4 KiB is more
//!   than any device). Bits past `bm_bits` in the last word are never sent and are cleared
//!   on receive, as DRBD's `bm_clear_surplus` keeps them.
//! - The VLI code ([`vli_encode`], [`vli_decode`]): 10 levels of 2..=64 code bits for run
//!   lengths 1..=[`VLI_MAX`], prefix in the low bits, written into an LSB-first bitstream
//!   ([`BitWriter`], [`BitReader`]).
//! - Packets: every bitmap packet, header included, fits 4096 bytes
//!   ([`DRBD_SOCKET_BUFFER_SIZE`]): a payload of at most 4080 bytes after an h100 header
//!   (agreed ≥ 100), 4088 after an h80 (86..=99). A plain packet carries
//!   `min(payload / 8, words left)` whole words (510 with h100: 32640 bits) starting at the
//!   word holding the current bit; a compressed one 1 encoding byte + at most 4079 code
//!   bytes, sent only if it covers at least 8 bits per code byte (DRBD's `plain_bits ≥
//!   8·len`), only if `use-rle` and agreed ≥ 90.
//! - Bounds: a transfer of N bits is at most `⌈N / (8·payload)⌉` plain packets with data
//!   plus the empty `P_BITMAP` that ends a transfer whose last packet was plain. Every
//!   compressed packet but the last has a full code buffer and covers ≥ 8 bits per byte,
//!   so there are at most `⌈N / (8·(payload − 9))⌉ + 1` of them. The receiver advances by at
//!   least one bit per packet and refuses anything past `bm_bits`, so a hostile peer gets at
//!   most N + 1 packets accepted.
//!
//! The sender ([`BitmapSender`]) yields one payload at a time into a caller's buffer: a
//! 1 PiB device (2^38 bits, a 32 GiB bitmap) is never encoded into memory at once. The
//! receiver ([`BitmapReceiver`]) OR-merges each payload into the caller's bitmap as it
//! arrives (DRBD's `drbd_bm_merge_lel`). Both count packets and bytes per kind, as DRBD logs
//! them in `INFO_bm_xfer_stats` ([`XferStats::info_line`]).
//!
//! **These byte formats are DRBD's wire protocol: they must not change.**

use thiserror::Error;

use super::{Command, CompressedBitmap, Packet, WireCtx, DRBD_SOCKET_BUFFER_SIZE, RLE_VLI_BITS};

/// Largest value the VLI code can carry (`0x100000400202130`, 2^56 + the lower levels).
pub(crate) const VLI_MAX: u64 = 0x0100_0004_0020_2130;

/// Largest bitmap (in bits) this codec handles: 2^56, so every run length is VLI-encodable.
pub(crate) const MAX_BM_BITS: u64 = 1 << 56;

/// `p_compressed_bm.encoding` bit 7: the first run is of set bits.
const START_SET: u8 = 0x80;

/// DRBD's `VLI_L_1_1` table: (total code bits, prefix bits, prefix value), tried in this
/// order. The prefix is the low bits of the codeword; data bits follow above it.
const LEVELS: [(u32, u32, u64); 10] = [
    (2, 1, 0x00),
    (3, 2, 0x01),
    (5, 3, 0x03),
    (7, 4, 0x07),
    (10, 5, 0x0f),
    (14, 6, 0x1f),
    (21, 8, 0x3f),
    (29, 8, 0x7f),
    (42, 8, 0xbf),
    (64, 8, 0xff),
];

/// What went wrong in a bitmap transfer. Every receive error is fatal to the transfer
/// (DRBD drops the connection); the receiver refuses further packets after one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BitmapError {
    /// A run length of 0 cannot be VLI-coded (runs are ≥ 1).
    #[error("a run length of 0 cannot be VLI-encoded")]
    VliZero,
    /// A run length above [`VLI_MAX`].
    #[error("run length {0} is larger than the VLI code can carry ({VLI_MAX})")]
    VliOverflow(u64),
    /// The caller's bitmap slice does not have `⌈bm_bits / 64⌉` words.
    #[error("bitmap of {got} words for {bm_bits} bits (want {want} words)")]
    WrongLength {
        /// Valid bits.
        bm_bits: u64,
        /// Words the bitmap must have.
        want: u64,
        /// Words it has.
        got: usize,
    },
    /// More than [`MAX_BM_BITS`] bits.
    #[error("bitmap of {0} bits is larger than {MAX_BM_BITS}")]
    TooManyBits(u64),
    /// A packet that is neither `P_BITMAP` nor `P_COMPRESSED_BITMAP`.
    #[error("{0} during the bitmap exchange (want P_BITMAP or P_COMPRESSED_BITMAP)")]
    NotABitmap(Command),
    /// A `P_BITMAP` whose size is not exactly what is due at this offset.
    #[error("P_BITMAP of {got} bytes at word {word_offset}: exactly {want} are due")]
    PlainSize {
        /// Bytes due: `8 × min(payload / 8, words left)`.
        want: u64,
        /// Bytes received.
        got: usize,
        /// Word the packet would start at.
        word_offset: u64,
    },
    /// A `P_COMPRESSED_BITMAP` of ≤ 1 byte (no code).
    #[error("P_COMPRESSED_BITMAP of {0} bytes is too small")]
    CompressedTooSmall(usize),
    /// A `P_COMPRESSED_BITMAP` larger than 4096 − header.
    #[error("P_COMPRESSED_BITMAP of {got} bytes is larger than {max}")]
    CompressedTooLarge {
        /// Bytes received.
        got: usize,
        /// Most allowed.
        max: usize,
    },
    /// `encoding & 0x0f` is not `RLE_VLI_Bits` (2).
    #[error("unknown bitmap encoding {0:#04x} (want RLE_VLI_Bits, 2)")]
    BadEncoding(u8),
    /// A codeword needs more bits than the packet's code has left.
    #[error("bitmap code truncated: a {need}-bit codeword with {have} bits left")]
    Truncated {
        /// Code bits left.
        have: u32,
        /// Bits the codeword at that point needs.
        need: u32,
    },
    /// A run that ends past the last bit of the bitmap.
    #[error("bitmap run of {len} bits at bit {start} goes past the end ({bm_bits} bits)")]
    RunPastEnd {
        /// First bit of the run.
        start: u64,
        /// Its length.
        len: u64,
        /// Valid bits.
        bm_bits: u64,
    },
    /// A bitmap packet after the transfer was complete.
    #[error("a bitmap packet after the transfer was complete")]
    AfterDone,
    /// A packet after an earlier error ended the transfer.
    #[error("the bitmap transfer already failed")]
    Failed,
}

// ---------------------------------------------------------------------------------------
// VLI code

/// Encodes run length `v` as DRBD's VLI: `(codeword, code bits)`, the codeword's low
/// `code bits` bits to be put LSB-first into the bitstream (`__vli_encode_bits`).
pub fn vli_encode(v: u64) -> Result<(u64, u32), BitmapError> {
    if v == 0 {
        return Err(BitmapError::VliZero);
    }
    // `max` is the largest value of the levels so far, `adj` the smallest of this level.
    let mut max = 0u64;
    let mut adj = 1u64;
    for &(total, prefix_bits, prefix) in &LEVELS {
        max += 1u64 << (total - prefix_bits);
        if v <= max {
            return Ok((((v - adj) << prefix_bits) | prefix, total));
        }
        adj = max + 1;
    }
    Err(BitmapError::VliOverflow(v))
}

/// Decodes the VLI codeword in the low bits of `input`: `(value, code bits consumed)`
/// (`vli_decode_bits`). Every bit pattern is some level's prefix (the last level's prefix
/// 0xff completes the table), so this cannot fail; the value is ≥ 1 and ≤ [`VLI_MAX`].
/// The caller checks the consumed bits were really there.
pub(crate) fn vli_decode(input: u64) -> (u64, u32) {
    let mut adj = 1u64;
    for &(total, prefix_bits, prefix) in &LEVELS {
        if input & ((1u64 << prefix_bits) - 1) == prefix {
            let data = (input & (u64::MAX >> (64 - total))) >> prefix_bits;
            return (data + adj, total);
        }
        adj += 1u64 << (total - prefix_bits);
    }
    // Unreachable: the four patterns of bits 6..8 above a low 0b111111 are the prefixes
    // of levels 7..=10. Decode as the last level so there is no panic path.
    ((input >> 8) + adj - (1u64 << 56), 64)
}

// ---------------------------------------------------------------------------------------
// LSB-first bitstream

/// The bitstream has no room for the bits (`-ENOBUFS`); nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom;

/// DRBD's output bitstream: bits are appended least significant first, the first bit of
/// the stream being bit 0 of byte 0 (`bitstream_put_bits`).
#[derive(Debug)]
pub struct BitWriter<'a> {
    buf: &'a mut [u8],
    /// Bits written so far.
    pos: usize,
}

impl<'a> BitWriter<'a> {
    /// A writer over `buf`, which it zeroes (bits are OR-ed in).
    pub fn new(buf: &'a mut [u8]) -> Self {
        buf.fill(0);
        BitWriter { buf, pos: 0 }
    }

    /// Appends the low `bits` bits of `val` (`bits` ≤ 64; 0 writes nothing). If they do
    /// not fit, writes nothing and returns [`NoRoom`].
    pub fn put_bits(&mut self, val: u64, bits: u32) -> Result<(), NoRoom> {
        if bits == 0 {
            return Ok(());
        }
        if bits > 64 {
            return Err(NoRoom);
        }
        let room = self.buf.len().saturating_mul(8) - self.pos;
        let n = bits as usize;
        if n > room {
            return Err(NoRoom);
        }
        let mut v = if bits < 64 {
            val & (u64::MAX >> (64 - bits))
        } else {
            val
        };
        let mut left = bits;
        while left > 0 {
            let off = u32::try_from(self.pos % 8).unwrap_or(0);
            let take = (8 - off).min(left);
            if let Some(b) = self.buf.get_mut(self.pos / 8) {
                // `take` ≤ 8 - off bits shifted by `off` stay inside one byte.
                *b |= ((v & ((1u64 << take) - 1)) << off).to_le_bytes()[0];
            }
            v = v.checked_shr(take).unwrap_or(0);
            self.pos += take as usize;
            left -= take;
        }
        Ok(())
    }

    /// Bits written.
    pub fn bits(&self) -> usize {
        self.pos
    }

    /// Bytes the written bits occupy (the last one possibly partial).
    pub fn bytes(&self) -> usize {
        self.pos.div_ceil(8)
    }

    /// Zero bits padding the last byte (`(8 − bits % 8) & 7`).
    pub fn pad_bits(&self) -> u8 {
        u8::try_from((8 - self.pos % 8) & 7).unwrap_or(0)
    }
}

/// DRBD's input bitstream: `buf.len() × 8 − pad_bits` valid bits, read least significant
/// first (`bitstream_get_bits`).
#[derive(Debug)]
pub(crate) struct BitReader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> BitReader<'a> {
    /// A reader of the first `buf.len() × 8 − pad_bits` bits of `buf` (none if `pad_bits`
    /// is more than that).
    pub fn new(buf: &'a [u8], pad_bits: u8) -> Self {
        let end = buf
            .len()
            .saturating_mul(8)
            .saturating_sub(usize::from(pad_bits));
        BitReader { buf, pos: 0, end }
    }

    /// Valid bits not read yet.
    pub fn remaining(&self) -> usize {
        self.end - self.pos
    }

    /// Reads up to `bits` (≤ 64) bits: `(value, bits read)`, fewer than asked only at the
    /// end of the stream (then the value's high bits are zero).
    pub fn get_bits(&mut self, bits: u32) -> (u64, u32) {
        let want = usize::try_from(bits.min(64))
            .unwrap_or(64)
            .min(self.remaining());
        let mut val = 0u64;
        let mut got = 0usize;
        while got < want {
            let off = self.pos % 8;
            let take = (8 - off).min(want - got);
            let byte = u64::from(self.buf.get(self.pos / 8).copied().unwrap_or(0));
            let chunk = (byte >> off) & ((1u64 << take) - 1);
            val |= chunk << got;
            got += take;
            self.pos += take;
        }
        (val, u32::try_from(got).unwrap_or(0))
    }
}

// ---------------------------------------------------------------------------------------
// Sizes and statistics

/// Words of a bitmap of `bm_bits` bits (`⌈bm_bits / 64⌉`, DRBD's `bm_words` on 64-bit).
pub const fn bm_words(bm_bits: u64) -> u64 {
    bm_bits.div_ceil(64)
}

/// Largest bitmap packet payload at `ctx`: 4096 − header (4080 at agreed ≥ 100, else 4088).
pub const fn max_payload(ctx: &WireCtx) -> usize {
    DRBD_SOCKET_BUFFER_SIZE - ctx.header_len()
}

fn check_size(words: usize, bm_bits: u64) -> Result<(), BitmapError> {
    if bm_bits > MAX_BM_BITS {
        return Err(BitmapError::TooManyBits(bm_bits));
    }
    let want = bm_words(bm_bits);
    if u64::try_from(words).ok() != Some(want) {
        return Err(BitmapError::WrongLength {
            bm_bits,
            want,
            got: words,
        });
    }
    Ok(())
}

/// Packets and bytes (header included) of one transfer direction, per kind: DRBD's
/// `bm_xfer_ctx.packets[]` / `bytes[]` (64-bit here: a plain 1 PiB bitmap is 32 GiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XferStats {
    /// `P_BITMAP` packets.
    pub plain_packets: u64,
    /// `P_BITMAP` bytes, headers included.
    pub plain_bytes: u64,
    /// `P_COMPRESSED_BITMAP` packets.
    pub rle_packets: u64,
    /// `P_COMPRESSED_BITMAP` bytes, headers included.
    pub rle_bytes: u64,
    /// What DRBD computes an all-plain transfer would cost:
    /// `header × (⌈words / payload⌉ + 1) + 8 × words`. DRBD divides the word count by
    /// the payload *bytes*, so this undercounts headers; kept so the ratio matches the
    /// kernel's log line.
    pub plain_equivalent: u64,
}

impl XferStats {
    fn new(bm_bits: u64, header_len: usize) -> Self {
        let words = bm_words(bm_bits);
        let header = header_len as u64;
        let data = (DRBD_SOCKET_BUFFER_SIZE - header_len) as u64;
        XferStats {
            plain_equivalent: header
                .saturating_mul(words.div_ceil(data) + 1)
                .saturating_add(words.saturating_mul(8)),
            ..XferStats::default()
        }
    }

    /// Bytes of both kinds.
    pub fn total_bytes(&self) -> u64 {
        self.plain_bytes + self.rle_bytes
    }

    /// DRBD's compression figure in tenths of a percent (`1000 − 1000·total/plain`), or
    /// `None` where DRBD logs nothing (nothing sent, or no smaller than plain).
    pub fn compression_permille(&self) -> Option<u64> {
        let total = self.total_bytes();
        if total == 0 || total >= self.plain_equivalent {
            return None;
        }
        let r = (u128::from(total) * 1000 / u128::from(self.plain_equivalent)).min(1000);
        Some(1000 - u64::try_from(r).unwrap_or(1000))
    }

    /// The line DRBD logs after a transfer (`INFO_bm_xfer_stats`), `direction` "send" or
    /// "receive"; `None` where DRBD logs nothing.
    pub fn info_line(&self, direction: &str) -> Option<String> {
        let r = self.compression_permille()?;
        Some(format!(
            "{direction} bitmap stats [Bytes(packets)]: plain {}({}), RLE {}({}), total {}; \
             compression: {}.{}%",
            self.plain_bytes,
            self.plain_packets,
            self.rle_bytes,
            self.rle_packets,
            self.total_bytes(),
            r / 10,
            r % 10
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Sender

/// Produces the packets of one bitmap transfer, one at a time, exactly as DRBD 8.4's
/// `_drbd_send_bitmap` would for the same bitmap and agreement.
#[derive(Debug)]
pub struct BitmapSender<'a> {
    words: &'a [u64],
    bm_bits: u64,
    bm_words: u64,
    bit_offset: u64,
    word_offset: u64,
    header_len: usize,
    rle: bool,
    done: bool,
    stats: XferStats,
}

impl<'a> BitmapSender<'a> {
    /// A transfer of the first `bm_bits` bits of `words` (which must have exactly
    /// `⌈bm_bits / 64⌉` words) at the agreement `ctx`; RLE is tried if `use_rle` (DRBD's
    /// `use-rle`, default yes) and the agreed version is ≥ 90.
    pub fn new(
        words: &'a [u64],
        bm_bits: u64,
        ctx: &WireCtx,
        use_rle: bool,
    ) -> Result<Self, BitmapError> {
        check_size(words.len(), bm_bits)?;
        Ok(BitmapSender {
            words,
            bm_bits,
            bm_words: bm_words(bm_bits),
            bit_offset: 0,
            word_offset: 0,
            header_len: ctx.header_len(),
            rle: use_rle && ctx.version() >= 90,
            done: false,
            stats: XferStats::new(bm_bits, ctx.header_len()),
        })
    }

    /// True once the last packet has been produced.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Packets and bytes produced so far.
    pub fn stats(&self) -> XferStats {
        self.stats
    }

    /// The next packet's payload, written into `out` (cleared first; it grows to at most
    /// 4096 − header bytes), and its command: `P_COMPRESSED_BITMAP` (encoding byte + code)
    /// or `P_BITMAP` (little-endian words, or empty to end the transfer). `None` once the
    /// transfer is complete (`send_bitmap_rle_or_plain`).
    pub fn next_payload(&mut self, out: &mut Vec<u8>) -> Option<Command> {
        if self.done {
            return None;
        }
        let payload = DRBD_SOCKET_BUFFER_SIZE - self.header_len;
        out.clear();
        out.resize(payload, 0);
        if let Some((len, encoding)) = self.fill_rle_bits(out.get_mut(1..).unwrap_or_default()) {
            // (A compressed packet encodes at least one run, so len ≥ 1.)
            out.truncate(1 + len);
            if let Some(e) = out.first_mut() {
                *e = encoding;
            }
            self.stats.rle_packets += 1;
            self.stats.rle_bytes += (self.header_len + 1 + len) as u64;
            if self.bit_offset >= self.bm_bits {
                self.done = true;
            }
            return Some(Command::P_COMPRESSED_BITMAP);
        }
        // Not compressible (or RLE off): a buffer full of plain words from word_offset.
        out.clear();
        let num_words = ((payload / 8) as u64).min(self.bm_words - self.word_offset);
        for w in self.word_offset..self.word_offset + num_words {
            out.extend_from_slice(&self.word(w).to_le_bytes());
        }
        self.word_offset += num_words;
        self.bit_offset = (self.word_offset * 64).min(self.bm_bits);
        self.stats.plain_packets += 1;
        self.stats.plain_bytes += (self.header_len + out.len()) as u64;
        if num_words == 0 {
            self.done = true;
        }
        Some(Command::P_BITMAP)
    }

    /// [`Self::next_payload`] as a [`Packet`] (allocates one payload per packet).
    pub fn next_packet(&mut self) -> Option<Packet> {
        let mut out = Vec::new();
        match self.next_payload(&mut out)? {
            Command::P_COMPRESSED_BITMAP => {
                let (encoding, code) = out.split_first()?;
                Some(Packet::CompressedBitmap(CompressedBitmap {
                    encoding: *encoding,
                    code: code.to_vec(),
                }))
            }
            _ => Some(Packet::Bitmap(out)),
        }
    }

    /// Word `w` as it goes on the wire: bits past `bm_bits` cleared (DRBD keeps them clear
    /// in core), 0 past the end.
    fn word(&self, w: u64) -> u64 {
        let v = usize::try_from(w)
            .ok()
            .and_then(|i| self.words.get(i))
            .copied()
            .unwrap_or(0);
        if w + 1 == self.bm_words && !self.bm_bits.is_multiple_of(64) {
            v & ((1u64 << (self.bm_bits % 64)) - 1)
        } else {
            v
        }
    }

    /// The first bit at or after `from` whose value is `set`, or `bm_bits` if none
    /// (`_drbd_bm_find_next` / `_drbd_bm_find_next_zero`).
    fn find(&self, from: u64, set: bool) -> u64 {
        if from >= self.bm_bits {
            return self.bm_bits;
        }
        let flip = if set { 0 } else { u64::MAX };
        let mut w = from / 64;
        let mut x = (self.word(w) ^ flip) & (u64::MAX << (from % 64));
        loop {
            if x != 0 {
                return (w * 64 + u64::from(x.trailing_zeros())).min(self.bm_bits);
            }
            w += 1;
            if w >= self.bm_words {
                return self.bm_bits;
            }
            x = self.word(w) ^ flip;
        }
    }

    /// DRBD's `fill_bitmap_rle_bits`: RLE+VLI-encodes runs from `bit_offset` into `code`
    /// until it is full or the bitmap ends. `Some((code bytes, encoding byte))` if that
    /// compresses (`plain_bits ≥ 8·len`); otherwise rewinds `bit_offset` to the start of
    /// its 64-bit word, for a plain packet, and returns `None`.
    fn fill_rle_bits(&mut self, code: &mut [u8]) -> Option<(usize, u8)> {
        if !self.rle || self.bit_offset >= self.bm_bits {
            return None;
        }
        let mut bs = BitWriter::new(code);
        let start = self.bit_offset;
        // The polarity of the first run is implicit in the encoding byte.
        let first_set = self.find(start, true) == start;
        let mut run_set = first_set;
        let mut plain_bits = 0u64;
        while self.bit_offset < self.bm_bits {
            let next = self.find(self.bit_offset, !run_set);
            // > 0: the bit at bit_offset has polarity run_set.
            let rl = next - self.bit_offset;
            let Ok((codeword, bits)) = vli_encode(rl) else {
                // Unreachable (rl ≤ MAX_BM_BITS < VLI_MAX); stop, as at a full buffer.
                break;
            };
            if bs.put_bits(codeword, bits).is_err() {
                break;
            }
            run_set = !run_set;
            plain_bits += rl;
            self.bit_offset = next;
        }
        let len = bs.bytes();
        if len == 0 || plain_bits < (len as u64) * 8 {
            // Incompressible with this method: rewind to the word holding the start.
            self.word_offset = start / 64;
            self.bit_offset = self.word_offset * 64;
            return None;
        }
        self.word_offset = self.bit_offset / 64;
        let start_bit = if first_set { START_SET } else { 0 };
        Some((len, start_bit | (bs.pad_bits() << 4) | RLE_VLI_BITS))
    }
}

// ---------------------------------------------------------------------------------------
// Receiver

/// Merges the packets of one incoming bitmap transfer into a bitmap, as DRBD 8.4's
/// `receive_bitmap` does, refusing anything DRBD refuses and anything that would reach
/// past the end.
#[derive(Debug, Clone)]
pub struct BitmapReceiver {
    bm_bits: u64,
    bm_words: u64,
    bit_offset: u64,
    word_offset: u64,
    header_len: usize,
    done: bool,
    failed: bool,
    newly_set: u64,
    stats: XferStats,
}

impl BitmapReceiver {
    /// A receiver for a bitmap of `bm_bits` bits (≤ [`MAX_BM_BITS`]) at the agreement
    /// `ctx` (which fixes the header size and so the plain packet size).
    pub fn new(bm_bits: u64, ctx: &WireCtx) -> Result<Self, BitmapError> {
        if bm_bits > MAX_BM_BITS {
            return Err(BitmapError::TooManyBits(bm_bits));
        }
        Ok(BitmapReceiver {
            bm_bits,
            bm_words: bm_words(bm_bits),
            bit_offset: 0,
            word_offset: 0,
            header_len: ctx.header_len(),
            done: false,
            failed: false,
            newly_set: 0,
            stats: XferStats::new(bm_bits, ctx.header_len()),
        })
    }

    /// True once the transfer is complete (a compressed packet reached `bm_bits`, or the
    /// empty `P_BITMAP` arrived).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The bit the next packet starts at.
    pub fn bit_offset(&self) -> u64 {
        self.bit_offset
    }

    /// Bits this transfer turned from 0 to 1 in the caller's bitmap (for its set-bit count).
    pub fn newly_set(&self) -> u64 {
        self.newly_set
    }

    /// Packets and bytes received so far.
    pub fn stats(&self) -> XferStats {
        self.stats
    }

    /// OR-merges one packet into `bitmap` (which must have `⌈bm_bits / 64⌉` words).
    /// `Ok(true)` when the transfer is complete, `Ok(false)` when more packets are due.
    pub fn receive_packet(
        &mut self,
        bitmap: &mut [u64],
        packet: &Packet,
    ) -> Result<bool, BitmapError> {
        match packet {
            Packet::Bitmap(words) => self.receive(bitmap, Command::P_BITMAP, words),
            Packet::CompressedBitmap(c) => self.receive_compressed(bitmap, c.encoding, &c.code),
            other => {
                let cmd = other.command();
                self.guard(bitmap, |_, _| Err(BitmapError::NotABitmap(cmd)))
            }
        }
    }

    /// OR-merges the payload of one `cmd` packet into `bitmap` (which must have
    /// `⌈bm_bits / 64⌉` words). `Ok(true)` when the transfer is complete.
    pub fn receive(
        &mut self,
        bitmap: &mut [u64],
        cmd: Command,
        payload: &[u8],
    ) -> Result<bool, BitmapError> {
        match cmd {
            Command::P_BITMAP => self.guard(bitmap, |r, bm| r.plain(bm, payload)),
            Command::P_COMPRESSED_BITMAP => match payload.split_first() {
                Some((&encoding, code)) => self.receive_compressed(bitmap, encoding, code),
                None => self.guard(bitmap, |_, _| Err(BitmapError::CompressedTooSmall(0))),
            },
            other => self.guard(bitmap, |_, _| Err(BitmapError::NotABitmap(other))),
        }
    }

    fn receive_compressed(
        &mut self,
        bitmap: &mut [u64],
        encoding: u8,
        code: &[u8],
    ) -> Result<bool, BitmapError> {
        self.guard(bitmap, |r, bm| r.compressed(bm, encoding, code))
    }

    /// Runs one packet's merge with the checks every packet shares; any error ends the
    /// transfer.
    fn guard(
        &mut self,
        bitmap: &mut [u64],
        f: impl FnOnce(&mut Self, &mut [u64]) -> Result<bool, BitmapError>,
    ) -> Result<bool, BitmapError> {
        // A finished transfer stays finished (and is_done) whatever comes after it.
        if self.failed {
            return Err(BitmapError::Failed);
        }
        if self.done {
            return Err(BitmapError::AfterDone);
        }
        match check_size(bitmap.len(), self.bm_bits).and_then(|()| f(self, bitmap)) {
            Ok(done) => {
                self.done = done;
                Ok(done)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// `receive_bitmap_plain`: exactly `8 × min(payload / 8, words left)` bytes.
    fn plain(&mut self, bitmap: &mut [u64], payload: &[u8]) -> Result<bool, BitmapError> {
        let data_size = (DRBD_SOCKET_BUFFER_SIZE - self.header_len) as u64;
        let num_words = (data_size / 8).min(self.bm_words.saturating_sub(self.word_offset));
        let want = num_words * 8;
        if u64::try_from(payload.len()).ok() != Some(want) {
            return Err(BitmapError::PlainSize {
                want,
                got: payload.len(),
                word_offset: self.word_offset,
            });
        }
        self.stats.plain_packets += 1;
        self.stats.plain_bytes += (self.header_len + payload.len()) as u64;
        if want == 0 {
            return Ok(true);
        }
        let mut w = self.word_offset;
        for chunk in payload.chunks_exact(8) {
            let mut le = [0u8; 8];
            le.copy_from_slice(chunk);
            self.or_word(bitmap, w, u64::from_le_bytes(le));
            w += 1;
        }
        self.word_offset = w;
        self.bit_offset = (w * 64).min(self.bm_bits);
        if w == self.bm_words {
            // DRBD's merge ends with bm_clear_surplus: no bit past bm_bits stays set.
            if let Some(last) = usize::try_from(w - 1).ok().and_then(|i| bitmap.get_mut(i)) {
                if !self.bm_bits.is_multiple_of(64) {
                    *last &= (1u64 << (self.bm_bits % 64)) - 1;
                }
            }
        }
        Ok(false)
    }

    /// `decode_bitmap_c` / `recv_bm_rle_bits`: decodes runs with a 64-bit look-ahead and
    /// sets the bits of every set run. Done when the runs end exactly at `bm_bits`.
    fn compressed(
        &mut self,
        bitmap: &mut [u64],
        encoding: u8,
        code: &[u8],
    ) -> Result<bool, BitmapError> {
        let max = DRBD_SOCKET_BUFFER_SIZE - self.header_len;
        let size = code.len() + 1;
        if size > max {
            return Err(BitmapError::CompressedTooLarge { got: size, max });
        }
        if code.is_empty() {
            return Err(BitmapError::CompressedTooSmall(size));
        }
        if encoding & 0x0f != RLE_VLI_BITS {
            return Err(BitmapError::BadEncoding(encoding));
        }
        let mut bs = BitReader::new(code, (encoding >> 4) & 7);
        let mut toggle = encoding & START_SET != 0;
        let mut s = self.bit_offset;
        let (mut look_ahead, mut have) = bs.get_bits(64);
        while have > 0 {
            let (rl, bits) = vli_decode(look_ahead);
            // DRBD applies the run before this check; a truncated packet is fatal either
            // way, so check first and touch nothing.
            if have < bits {
                return Err(BitmapError::Truncated { have, need: bits });
            }
            // DRBD checks only set runs against the end (a clear run past it would leave
            // its offsets past the bitmap); a correct sender never produces either.
            let end = s.checked_add(rl).filter(|&e| e <= self.bm_bits).ok_or(
                BitmapError::RunPastEnd {
                    start: s,
                    len: rl,
                    bm_bits: self.bm_bits,
                },
            )?;
            if toggle {
                self.set_range(bitmap, s, end);
            }
            look_ahead = look_ahead.checked_shr(bits).unwrap_or(0);
            have -= bits;
            let (tmp, got) = bs.get_bits(64 - have);
            look_ahead |= tmp.checked_shl(have).unwrap_or(0);
            have += got;
            s = end;
            toggle = !toggle;
        }
        self.bit_offset = s;
        self.word_offset = s / 64;
        self.stats.rle_packets += 1;
        self.stats.rle_bytes += (self.header_len + size) as u64;
        Ok(s == self.bm_bits)
    }

    /// ORs `v` into word `w`, counting new bits.
    fn or_word(&mut self, bitmap: &mut [u64], w: u64, v: u64) {
        if let Some(x) = usize::try_from(w).ok().and_then(|i| bitmap.get_mut(i)) {
            let new = v & !*x;
            // Surplus bits of the last word are cleared afterwards and do not count.
            let valid = if w + 1 == self.bm_words && !self.bm_bits.is_multiple_of(64) {
                new & ((1u64 << (self.bm_bits % 64)) - 1)
            } else {
                new
            };
            self.newly_set += u64::from(valid.count_ones());
            *x |= v;
        }
    }

    /// Sets bits `from..to` (`to` ≤ `bm_bits`).
    fn set_range(&mut self, bitmap: &mut [u64], from: u64, to: u64) {
        let mut b = from;
        while b < to {
            let w = b / 64;
            let lo = b % 64;
            let hi = (to - w * 64).min(64);
            let mask = (u64::MAX >> (64 - (hi - lo))) << lo;
            self.or_word(bitmap, w, mask);
            b = w * 64 + hi;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn us(x: u64) -> usize {
        usize::try_from(x).expect("fits")
    }

    fn ctx(version: u32) -> WireCtx {
        WireCtx::new(version, 0).expect("valid version")
    }

    /// Every packet of a transfer as (command, payload).
    fn send_all(words: &[u64], bm_bits: u64, c: &WireCtx, rle: bool) -> Vec<(Command, Vec<u8>)> {
        let mut s = BitmapSender::new(words, bm_bits, c, rle).expect("sender");
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(cmd) = s.next_payload(&mut buf) {
            out.push((cmd, buf.clone()));
            assert!(out.len() < 1_000_000, "runaway sender");
        }
        assert!(s.is_done());
        out
    }

    fn receive_all(
        packets: &[(Command, Vec<u8>)],
        bm_bits: u64,
        c: &WireCtx,
        into: &mut [u64],
    ) -> BitmapReceiver {
        let mut r = BitmapReceiver::new(bm_bits, c).expect("receiver");
        for (i, (cmd, p)) in packets.iter().enumerate() {
            let done = r.receive(into, *cmd, p).expect("valid packet");
            assert_eq!(
                done,
                i + 1 == packets.len(),
                "packet {i} of {}",
                packets.len()
            );
        }
        r
    }

    /// Hand-computed codewords at both ends of every level: (value, codeword, bits).
    /// Codeword = ((v − first value of the level) << prefix bits) | prefix.
    const VLI_GOLDEN: [(u64, u64, u32); 20] = [
        (1, 0b0, 2),
        (2, 0b10, 2),
        (3, 0b001, 3),
        (4, 0b101, 3),
        (5, 0b0_0011, 5),
        (8, 0b11_011, 5),
        (9, 0b000_0111, 7),
        (16, 0b111_0111, 7),
        (17, 0x00f, 10),
        (48, 0x3ef, 10),
        (49, 0x001f, 14),
        (304, 0x3fdf, 14),
        (305, 0x00_003f, 21),
        (8496, 0x1f_ff3f, 21),
        (8497, 0x0000_007f, 29),
        (0x20_2130, 0x1fff_ff7f, 29),
        (0x20_2131, 0x000_0000_00bf, 42),
        (0x4_0020_2130, 0x3ff_ffff_ffbf, 42),
        (0x4_0020_2131, 0x0000_0000_0000_00ff, 64),
        (0x0100_0004_0020_2130, 0xffff_ffff_ffff_ffff, 64),
    ];

    #[test]
    fn vli_codewords_at_every_level_boundary() {
        for &(v, code, bits) in &VLI_GOLDEN {
            assert_eq!(vli_encode(v), Ok((code, bits)), "encode {v:#x}");
            assert_eq!(vli_decode(code), (v, bits), "decode {code:#x}");
            // Bits above the codeword (the next codewords) do not change the decode.
            if bits < 64 {
                assert_eq!(vli_decode(code | (u64::MAX << bits)), (v, bits));
            }
        }
        assert_eq!(vli_encode(0), Err(BitmapError::VliZero));
        assert_eq!(
            vli_encode(VLI_MAX + 1),
            Err(BitmapError::VliOverflow(VLI_MAX + 1))
        );
        assert_eq!(
            vli_encode(u64::MAX),
            Err(BitmapError::VliOverflow(u64::MAX))
        );
    }

    #[test]
    fn vli_decodes_every_low_pattern_and_round_trips() {
        // Every 16-bit pattern (with random high bits) is a valid codeword's start.
        let mut rng = StdRng::seed_from_u64(0x766c_6901);
        for low in 0..=u16::MAX {
            let input = u64::from(low) | (rng.gen::<u64>() << 16);
            let (v, bits) = vli_decode(input);
            assert!((1..=VLI_MAX).contains(&v) && (2..=64).contains(&bits));
            let (code, b2) = vli_encode(v).expect("decoded values encode");
            assert_eq!(b2, bits);
            let mask = u64::MAX >> (64 - bits);
            assert_eq!(code, input & mask, "{input:#x}");
        }
        for _ in 0..100_000 {
            let shift = rng.gen_range(0..57);
            let v = rng.gen_range(1..=VLI_MAX) >> shift;
            let v = v.max(1);
            let (code, bits) = vli_encode(v).expect("in range");
            assert_eq!(vli_decode(code), (v, bits));
        }
    }

    #[test]
    fn bitstream_is_lsb_first() {
        let mut buf = [0xaau8; 3];
        let mut w = BitWriter::new(&mut buf);
        w.put_bits(1, 1).expect("room");
        w.put_bits(0, 1).expect("room");
        // High bits beyond `bits` are ignored (DRBD's paranoia mask).
        w.put_bits(0xffff_ffff_ffff_ffff, 8).expect("room");
        w.put_bits(0b101, 3).expect("room");
        assert_eq!((w.bits(), w.bytes(), w.pad_bits()), (13, 2, 3));
        // 11 bits left: 12 do not fit and leave the stream as it was.
        assert_eq!(w.put_bits(0xfff, 12), Err(NoRoom));
        assert_eq!(w.bits(), 13);
        w.put_bits(0, 0).expect("nothing to do");
        // byte 0: bit0 = 1, bit1 = 0, bits 2..8 = low 6 bits of 0xff;
        // byte 1: bits 0..2 = high 2 bits of 0xff, bits 2..5 = 0b101.
        assert_eq!(buf, [0xfd, 0x17, 0x00]);

        let mut r = BitReader::new(&buf[..2], 3);
        assert_eq!(r.remaining(), 13);
        assert_eq!(r.get_bits(1), (1, 1));
        assert_eq!(r.get_bits(1), (0, 1));
        assert_eq!(r.get_bits(8), (0xff, 8));
        // Asking past the end returns what is there.
        assert_eq!(r.get_bits(64), (0b101, 3));
        assert_eq!(r.get_bits(64), (0, 0));

        // 64-bit values across 9 bytes.
        let mut buf = [0u8; 9];
        let mut w = BitWriter::new(&mut buf);
        w.put_bits(0b1, 1).expect("room");
        w.put_bits(0x8123_4567_89ab_cdef, 64).expect("room");
        assert_eq!(w.put_bits(0, 8), Err(NoRoom));
        let mut r = BitReader::new(&buf, 7);
        assert_eq!(r.get_bits(1), (1, 1));
        assert_eq!(r.get_bits(64), (0x8123_4567_89ab_cdef, 64));
        // A pad longer than the buffer leaves nothing to read.
        assert_eq!(BitReader::new(&[0xff], 7).remaining(), 1);
        assert_eq!(BitReader::new(&[], 7).remaining(), 0);
    }

    #[test]
    fn all_set_bitmap_is_one_run() {
        // 1014 bits (a 4 MiB device, as in the kernel captures), all set: one run of
        // 1014 = level 7 (305..=8496), (1014 − 305) << 8 | 0x3f = 0x2c53f in 21 bits,
        // LE bytes 3f c5 02, 3 pad bits; encoding = set-first 0x80 | 3 << 4 | 2 = 0xb2.
        let bits = 1014;
        let mut words = vec![u64::MAX; 16];
        words[15] = (1 << (1014 - 960)) - 1;
        let c = ctx(101);
        let p = send_all(&words, bits, &c, true);
        assert_eq!(
            p,
            [(Command::P_COMPRESSED_BITMAP, vec![0xb2, 0x3f, 0xc5, 0x02])]
        );
        let mut s = BitmapSender::new(&words, bits, &c, true).expect("sender");
        while s.next_payload(&mut Vec::new()).is_some() {}
        let st = s.stats();
        assert_eq!((st.rle_packets, st.rle_bytes, st.plain_packets), (1, 20, 0));
        // plain = 16 × (⌈16 / 4080⌉ + 1) + 16 × 8 = 160; 1000 − 1000·20/160 = 875.
        assert_eq!(st.plain_equivalent, 160);
        assert_eq!(
            st.info_line("send").as_deref(),
            Some(
                "send bitmap stats [Bytes(packets)]: plain 0(0), RLE 20(1), total 20; \
                 compression: 87.5%"
            )
        );
        // Garbage past bm_bits in the caller's last word is not sent.
        words[15] = u64::MAX;
        assert_eq!(send_all(&words, bits, &c, true), p);

        let mut got = vec![0u64; 16];
        let r = receive_all(&p, bits, &c, &mut got);
        assert_eq!(got[..15], [u64::MAX; 15]);
        assert_eq!(got[15], (1 << 54) - 1);
        assert_eq!(r.newly_set(), 1014);
        assert_eq!(r.stats().rle_bytes, 20);
    }

    #[test]
    fn clear_bitmap_and_empty_bitmap() {
        // 1014 clear bits: one clear run, encoding 0x32 (clear first, 3 pad bits).
        let c = ctx(101);
        assert_eq!(
            send_all(&[0; 16], 1014, &c, true),
            [(Command::P_COMPRESSED_BITMAP, vec![0x32, 0x3f, 0xc5, 0x02])]
        );
        // No bits: DRBD sends one empty P_BITMAP.
        assert_eq!(send_all(&[], 0, &c, true), [(Command::P_BITMAP, vec![])]);
        let mut none: [u64; 0] = [];
        let r = receive_all(&[(Command::P_BITMAP, vec![])], 0, &c, &mut none);
        assert!(r.is_done());
    }

    #[test]
    fn incompressible_bitmap_goes_plain_and_ends_with_an_empty_packet() {
        // 600 words of 0x55…: runs of 1 bit cost 2 code bits each, so every RLE attempt
        // fails and DRBD sends 510 + 90 words, then the empty P_BITMAP.
        let words = vec![0x5555_5555_5555_5555u64; 600];
        let c = ctx(101);
        let p = send_all(&words, 600 * 64, &c, true);
        let shape: Vec<(Command, usize)> = p.iter().map(|(c, b)| (*c, b.len())).collect();
        assert_eq!(
            shape,
            [
                (Command::P_BITMAP, 4080),
                (Command::P_BITMAP, 720),
                (Command::P_BITMAP, 0)
            ]
        );
        assert_eq!(p[0].1[..8], 0x5555_5555_5555_5555u64.to_le_bytes());
        // h80 (agreed < 100): 4088-byte payloads, 511 words.
        let shape: Vec<usize> = send_all(&words, 600 * 64, &ctx(95), true)
            .iter()
            .map(|(_, b)| b.len())
            .collect();
        assert_eq!(shape, [4088, 712, 0]);
        let mut s = BitmapSender::new(&words, 600 * 64, &c, true).expect("sender");
        while s.next_payload(&mut Vec::new()).is_some() {}
        // Not compressed: DRBD logs nothing.
        assert_eq!(s.stats().info_line("send"), None);
        assert_eq!(
            (s.stats().plain_packets, s.stats().plain_bytes),
            (3, 16 * 3 + 4800)
        );
    }

    #[test]
    fn compressed_then_plain_rewinds_to_the_word() {
        // 100000 clear bits, then 100000 alternating bits (set first). The first packet
        // fills its 4079 code bytes: 100000 (level 8, 29 bits) + 16301 one-bit runs × 2
        // bits = 32631 bits (the next would need 32633 > 32632), covering 116301 bits ≥
        // 8 × 4079: compressed, 1 pad bit, encoding 0x12. The rest does not compress:
        // plain packets from word 116301 / 64 = 1817 (bit 116288), 510 + 510 + 288
        // words, then the empty P_BITMAP.
        let bits = 200_000u64;
        let mut words = vec![0u64; 3125];
        for b in 100_000..bits {
            if (b - 100_000) % 2 == 0 {
                words[us(b / 64)] |= 1 << (b % 64);
            }
        }
        let c = ctx(101);
        let p = send_all(&words, bits, &c, true);
        let shape: Vec<(Command, usize)> = p.iter().map(|(c, b)| (*c, b.len())).collect();
        assert_eq!(
            shape,
            [
                (Command::P_COMPRESSED_BITMAP, 4080),
                (Command::P_BITMAP, 4080),
                (Command::P_BITMAP, 4080),
                (Command::P_BITMAP, 2304),
                (Command::P_BITMAP, 0),
            ]
        );
        assert_eq!(p[0].1[0], 0x12);
        // 100000 = level 8: (100000 − 8497) << 8 | 0x7f, 29 bits; then 0b00 codewords.
        let first = ((100_000u64 - 8497) << 8) | 0x7f;
        assert_eq!(p[0].1[1..5], first.to_le_bytes()[..4]);
        assert_eq!(p[0].1[4] & 0xe0, 0);
        assert!(p[0].1[5..].iter().all(|&b| b == 0));
        // The first plain packet starts at word 1817.
        assert_eq!(p[1].1[..8], words[1817].to_le_bytes());

        let mut r = BitmapReceiver::new(bits, &c).expect("receiver");
        let mut got = vec![0u64; 3125];
        assert!(!r.receive(&mut got, p[0].0, &p[0].1).expect("ok"));
        assert_eq!(r.bit_offset(), 116_301);
        for (cmd, b) in &p[1..] {
            r.receive(&mut got, *cmd, b).expect("ok");
        }
        assert!(r.is_done());
        assert_eq!(got, words);
        assert_eq!(r.newly_set(), 50_000);
    }

    #[test]
    fn rle_only_when_allowed() {
        let words = vec![0u64; 16];
        for (c, rle) in [(ctx(89), true), (ctx(101), false)] {
            let shape: Vec<(Command, usize)> = send_all(&words, 1014, &c, rle)
                .iter()
                .map(|(c, b)| (*c, b.len()))
                .collect();
            assert_eq!(shape, [(Command::P_BITMAP, 128), (Command::P_BITMAP, 0)]);
        }
        assert_eq!(
            send_all(&words, 1014, &ctx(90), true)[0].0,
            Command::P_COMPRESSED_BITMAP
        );
    }

    #[test]
    fn next_packet_builds_codec_packets() {
        let words = [0b1011u64];
        let mut s = BitmapSender::new(&words, 10, &ctx(101), true).expect("sender");
        // Runs: 2 set, 1 clear, 1 set, 6 clear: 2+2+2+5 = 11 code bits for 10 plain bits:
        // incompressible (10 < 16), so plain.
        assert_eq!(
            s.next_packet(),
            Some(Packet::Bitmap(vec![11, 0, 0, 0, 0, 0, 0, 0]))
        );
        assert_eq!(s.next_packet(), Some(Packet::Bitmap(vec![])));
        assert_eq!(s.next_packet(), None);
        let words = [1u64 << 40];
        let mut s = BitmapSender::new(&words, 64, &ctx(101), true).expect("sender");
        // 40 clear (level 5: 23 << 5 | 0xf, 10 bits), 1 set (2 bits), 23 clear (level 5:
        // 6 << 5 | 0xf): 22 bits, 3 bytes, 2 pad bits; 64 ≥ 24.
        let Some(Packet::CompressedBitmap(cb)) = s.next_packet() else {
            panic!("compressed")
        };
        // (The 1-bit run's codeword is 0b00 at bits 10..12.)
        let code = (23 << 5 | 0xf) | ((6 << 5 | 0xf) << 12);
        assert_eq!(cb.encoding, 0x22);
        assert_eq!(cb.code, u32::to_le_bytes(code)[..3]);
        assert_eq!(s.next_packet(), None);
    }

    #[test]
    fn sender_checks_its_arguments() {
        let c = ctx(101);
        assert_eq!(
            BitmapSender::new(&[0; 2], 64, &c, true).err(),
            Some(BitmapError::WrongLength {
                bm_bits: 64,
                want: 1,
                got: 2
            })
        );
        assert_eq!(
            BitmapReceiver::new(MAX_BM_BITS + 1, &c).err(),
            Some(BitmapError::TooManyBits(MAX_BM_BITS + 1))
        );
    }

    #[test]
    fn receiver_refuses_bad_packets() {
        let c = ctx(101);
        let fresh = || BitmapReceiver::new(1014, &c).expect("receiver");
        let mut bm = vec![0u64; 16];
        let cases: Vec<(Command, Vec<u8>, BitmapError)> = vec![
            (
                Command::P_BITMAP,
                vec![0; 120],
                BitmapError::PlainSize {
                    want: 128,
                    got: 120,
                    word_offset: 0,
                },
            ),
            (
                Command::P_BITMAP,
                vec![],
                BitmapError::PlainSize {
                    want: 128,
                    got: 0,
                    word_offset: 0,
                },
            ),
            (
                Command::P_COMPRESSED_BITMAP,
                vec![0x82],
                BitmapError::CompressedTooSmall(1),
            ),
            (
                Command::P_COMPRESSED_BITMAP,
                vec![],
                BitmapError::CompressedTooSmall(0),
            ),
            (
                Command::P_COMPRESSED_BITMAP,
                vec![0x02; 4081],
                BitmapError::CompressedTooLarge {
                    got: 4081,
                    max: 4080,
                },
            ),
            (
                Command::P_COMPRESSED_BITMAP,
                vec![0x83, 0x00],
                BitmapError::BadEncoding(0x83),
            ),
            // Run 1015 > 1014 bits (set, as DRBD checks; and clear).
            (
                Command::P_COMPRESSED_BITMAP,
                vec![0xb2, 0x3f, 0xc6, 0x02],
                BitmapError::RunPastEnd {
                    start: 0,
                    len: 1015,
                    bm_bits: 1014,
                },
            ),
            (
                Command::P_COMPRESSED_BITMAP,
                vec![0x32, 0x3f, 0xc6, 0x02],
                BitmapError::RunPastEnd {
                    start: 0,
                    len: 1015,
                    bm_bits: 1014,
                },
            ),
            // Level-7 prefix with only 8 code bits (pad 0): a 21-bit codeword truncated.
            (
                Command::P_COMPRESSED_BITMAP,
                vec![0x02, 0x3f],
                BitmapError::Truncated { have: 8, need: 21 },
            ),
            (
                Command::P_DATA,
                vec![],
                BitmapError::NotABitmap(Command::P_DATA),
            ),
        ];
        for (cmd, payload, want) in cases {
            let mut r = fresh();
            assert_eq!(r.receive(&mut bm, cmd, &payload), Err(want.clone()));
            // The transfer is over after an error.
            assert_eq!(
                r.receive(&mut bm, Command::P_BITMAP, &[0; 128]),
                Err(BitmapError::Failed),
                "{want}"
            );
        }
        assert!(bm.iter().all(|&w| w == 0), "nothing merged on errors");

        // A set run of 982 (0x02a53f, 21 bits) with the 3 padding bits not declared
        // (pad 0): they decode as a clear run of 1 (0b00), then 1 bit is left for a
        // codeword of ≥ 2: truncated. Runs before the bad codeword were merged (DRBD
        // merges as it decodes too; the error ends the connection either way).
        assert_eq!(vli_decode(0x0002_a53f), (982, 21));
        let mut r = fresh();
        assert_eq!(
            r.receive(
                &mut bm,
                Command::P_COMPRESSED_BITMAP,
                &[0x82, 0x3f, 0xa5, 0x02]
            ),
            Err(BitmapError::Truncated { have: 1, need: 2 })
        );
        assert_eq!(bm[..15], [u64::MAX; 15]);
        assert_eq!(bm[15], (1 << (982 - 960)) - 1);
        bm.fill(0);

        // Wrong bitmap slice.
        let mut r = fresh();
        assert_eq!(
            r.receive(&mut [0u64; 3], Command::P_BITMAP, &[0; 128]),
            Err(BitmapError::WrongLength {
                bm_bits: 1014,
                want: 16,
                got: 3
            })
        );
        // A packet after completion.
        let mut r = fresh();
        assert_eq!(
            r.receive(
                &mut bm,
                Command::P_COMPRESSED_BITMAP,
                &[0x32, 0x3f, 0xc5, 0x02]
            ),
            Ok(true)
        );
        assert_eq!(
            r.receive(&mut bm, Command::P_BITMAP, &[]),
            Err(BitmapError::AfterDone)
        );
        // After a plain packet reaching the end, only the empty P_BITMAP is accepted.
        let mut r = fresh();
        assert_eq!(
            r.receive(&mut bm, Command::P_BITMAP, &[0xff; 128]),
            Ok(false)
        );
        assert_eq!(r.bit_offset(), 1014);
        // Surplus bits past 1014 were cleared.
        assert_eq!(bm[15], (1 << 54) - 1);
        assert_eq!(r.newly_set(), 1014);
        let mut again = r.clone();
        assert_eq!(
            again.receive(&mut bm, Command::P_BITMAP, &[0; 8]),
            Err(BitmapError::PlainSize {
                want: 0,
                got: 8,
                word_offset: 16
            })
        );
        let mut again = r.clone();
        assert!(matches!(
            again.receive(&mut bm, Command::P_COMPRESSED_BITMAP, &[0x32, 0x00]),
            Err(BitmapError::RunPastEnd { start: 1014, .. })
        ));
        assert_eq!(r.receive(&mut bm, Command::P_BITMAP, &[]), Ok(true));
    }

    #[test]
    fn receiver_ors_into_what_is_there() {
        let mut rng = StdRng::seed_from_u64(0x6f72_6d65);
        let c = ctx(101);
        let bits = 70_001u64;
        let n = us(bm_words(bits));
        let mask_last = |v: &mut Vec<u64>| v[n - 1] &= (1 << (bits % 64)) - 1;
        let mut a: Vec<u64> = (0..n)
            .map(|_| rng.gen::<u64>() & rng.gen::<u64>())
            .collect();
        let mut b: Vec<u64> = (0..n)
            .map(|_| rng.gen::<u64>() & rng.gen::<u64>())
            .collect();
        mask_last(&mut a);
        mask_last(&mut b);
        let want: Vec<u64> = a.iter().zip(&b).map(|(x, y)| x | y).collect();
        let before: u32 = a.iter().map(|w| w.count_ones()).sum();
        let after: u32 = want.iter().map(|w| w.count_ones()).sum();
        let p = send_all(&b, bits, &c, true);
        let r = receive_all(&p, bits, &c, &mut a);
        assert_eq!(a, want);
        assert_eq!(r.newly_set(), u64::from(after - before));
    }

    /// A random bitmap of `bits` bits in one of several shapes.
    fn shape(rng: &mut StdRng, bits: u64, kind: u32) -> Vec<u64> {
        let n = us(bm_words(bits));
        let mut w = vec![0u64; n];
        let set = |w: &mut Vec<u64>, b: u64| w[us(b / 64)] |= 1 << (b % 64);
        match kind {
            0 => {}
            1 => w.fill(u64::MAX),
            2 => w.fill(0xaaaa_aaaa_aaaa_aaaa),
            // Long runs of random lengths.
            3 => {
                let mut b = 0;
                let mut on = rng.gen_bool(0.5);
                while b < bits {
                    let scale = rng.gen_range(0..20);
                    let len = rng.gen_range(1..=(1u64 << scale));
                    if on {
                        for x in b..(b + len).min(bits) {
                            set(&mut w, x);
                        }
                    }
                    b += len;
                    on = !on;
                }
            }
            // A single bit at the end.
            4 => {
                if bits > 0 {
                    set(&mut w, bits - 1);
                }
            }
            // Random density.
            5 => {
                let p = rng.gen_range(0.0..1.0);
                for b in 0..bits {
                    if rng.gen_bool(p) {
                        set(&mut w, b);
                    }
                }
            }
            // Noise islands in long clear/set stretches.
            _ => {
                let mut b = 0;
                while b < bits {
                    let stretch = rng.gen_range(1..200_000u64);
                    if rng.gen_bool(0.3) {
                        for x in b..(b + stretch).min(bits) {
                            if rng.gen_bool(0.5) {
                                set(&mut w, x);
                            }
                        }
                    } else if rng.gen_bool(0.5) {
                        for x in b..(b + stretch).min(bits) {
                            set(&mut w, x);
                        }
                    }
                    b += stretch;
                }
            }
        }
        // Garbage past the end: must not travel.
        if !bits.is_multiple_of(64) {
            w[n - 1] |= u64::MAX << (bits % 64);
        }
        w
    }

    #[test]
    fn random_bitmaps_round_trip_within_the_packet_bounds() {
        let mut rng = StdRng::seed_from_u64(0x626d_7266);
        let ctxs = [
            (ctx(101), true),
            (ctx(101), false),
            (ctx(95), true),
            (ctx(89), true),
        ];
        for round in 0..300 {
            let bits = match round % 4 {
                0 => rng.gen_range(0..200),
                1 => rng.gen_range(0..70_000),
                2 => rng.gen_range(0..400_000),
                _ => 64 * rng.gen_range(0..3000),
            };
            let kind = round % 7;
            let words = shape(&mut rng, bits, kind);
            let (c, rle) = ctxs[us(u64::from(round / 7)) % ctxs.len()];
            let p = send_all(&words, bits, &c, rle);
            let mut got = vec![0u64; words.len()];
            let r = receive_all(&p, bits, &c, &mut got);
            let mut want = words.clone();
            if !bits.is_multiple_of(64) {
                *want.last_mut().unwrap() &= (1 << (bits % 64)) - 1;
            }
            assert_eq!(got, want, "round {round}: {bits} bits, kind {kind}");
            let ones: u32 = want.iter().map(|w| w.count_ones()).sum();
            assert_eq!(r.newly_set(), u64::from(ones));

            // Bounds: payload sizes, plain packets ≤ ⌈N / (8·payload)⌉ + 1, compressed ≤
            // ⌈N / (8·(payload − 9))⌉ + 1, the terminator iff the last is plain.
            let payload = max_payload(&c);
            assert!(p.iter().all(|(_, b)| b.len() <= payload));
            let plain = p.iter().filter(|(c, _)| *c == Command::P_BITMAP).count() as u64;
            let rle_n = p.len() as u64 - plain;
            assert!(
                plain <= bits.div_ceil(8 * payload as u64) + 1,
                "round {round}"
            );
            assert!(rle_n <= bits.div_ceil(8 * (payload as u64 - 9)) + 1);
            let (last_cmd, last) = p.last().unwrap();
            if *last_cmd == Command::P_BITMAP {
                assert!(last.is_empty());
            }
            assert!(p[..p.len() - 1].iter().all(|(_, b)| !b.is_empty()));
            if !rle || c.version() < 90 {
                assert_eq!(rle_n, 0);
            }
            // Both sides count the same packets and bytes.
            let mut s = BitmapSender::new(&words, bits, &c, rle).expect("sender");
            while s.next_payload(&mut Vec::new()).is_some() {}
            assert_eq!(s.stats(), r.stats());
            assert_eq!(s.stats().plain_packets, plain);
        }
    }

    #[test]
    fn a_large_clear_bitmap_is_one_packet() {
        // 2^28 bits (a 1 TiB device, a 32 MiB bitmap): one run, one 5-byte packet.
        let bits = 1u64 << 28;
        let words = vec![0u64; us(bm_words(bits))];
        let c = ctx(101);
        let p = send_all(&words, bits, &c, true);
        assert_eq!(p.len(), 1);
        // 2^28 is level 9: (2^28 − 0x202131) << 8 | 0xbf, 42 bits → 6 bytes, pad 6.
        let code = ((bits - 0x20_2131) << 8) | 0xbf;
        let mut want = vec![0x62];
        want.extend_from_slice(&code.to_le_bytes()[..6]);
        assert_eq!(p[0], (Command::P_COMPRESSED_BITMAP, want));
    }
}
