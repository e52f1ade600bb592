//! Just enough of the NBD fixed-newstyle protocol to reach the transmission phase by hand
//! and then misbehave on purpose (the hostile tests); real IO goes through nbdsh and fio.
//!
//! Option replies are limited to [`MAX_OPTION_REPLY`] bytes and [`MAX_OPTION_REPLIES`]
//! replies per option; every read and write has a [`IO_TIMEOUT`] deadline.

use anyhow::{bail, Context};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// "NBDMAGIC", the server's first 8 bytes.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT", the option magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// Handshake flag `NBD_FLAG_FIXED_NEWSTYLE`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag `NBD_FLAG_NO_ZEROES`.
pub const FLAG_NO_ZEROES: u16 = 2;

/// Deadline of one read or write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest option reply payload accepted.
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Most replies accepted for one option.
pub const MAX_OPTION_REPLIES: usize = 64;

/// A TCP connection with read/write deadlines.
pub fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, crate::scaled(IO_TIMEOUT))
        .with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(crate::scaled(IO_TIMEOUT)))?;
    s.set_write_timeout(Some(crate::scaled(IO_TIMEOUT)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn read_u16(s: &mut impl Read) -> anyhow::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> anyhow::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> anyhow::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads the server greeting; returns its handshake flags.
pub fn read_greeting(s: &mut impl Read) -> anyhow::Result<u16> {
    let m = read_u64(s).context("read NBDMAGIC")?;
    if m != NBDMAGIC {
        bail!("server greeting starts with {m:#x}, not NBDMAGIC");
    }
    let o = read_u64(s).context("read IHAVEOPT")?;
    if o != IHAVEOPT {
        bail!("server is not newstyle: {o:#x}");
    }
    read_u16(s).context("read handshake flags")
}

/// Runs the handshake up to the transmission phase with `NBD_OPT_GO` on `export`;
/// returns the export size.
pub fn handshake_go(s: &mut (impl Read + Write), export: &str) -> anyhow::Result<u64> {
    let flags = read_greeting(s)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        bail!("server does not offer fixed newstyle (flags {flags:#x})");
    }
    let client_flags = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    s.write_all(&client_flags.to_be_bytes())?;

    let name = export.as_bytes();
    let name_len = u32::try_from(name.len()).context("export name length")?;
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(4 + name_len + 2).to_be_bytes());
    opt.extend_from_slice(&name_len.to_be_bytes());
    opt.extend_from_slice(name);
    opt.extend_from_slice(&0u16.to_be_bytes()); // no information requests
    s.write_all(&opt)?;

    let mut size = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let magic = read_u64(s).context("read option reply magic")?;
        if magic != OPT_REPLY_MAGIC {
            bail!("bad option reply magic {magic:#x}");
        }
        let option = read_u32(s)?;
        let typ = read_u32(s)?;
        let len = read_u32(s)?;
        if option != OPT_GO {
            bail!("reply for option {option}, expected NBD_OPT_GO");
        }
        if len > MAX_OPTION_REPLY {
            bail!("option reply of {len} bytes");
        }
        let mut data = vec![0u8; usize::try_from(len)?];
        s.read_exact(&mut data)?;
        if typ & 0x8000_0000 != 0 {
            bail!(
                "NBD_OPT_GO refused with reply type {typ:#x}: {}",
                String::from_utf8_lossy(&data)
            );
        }
        match typ {
            REP_ACK => {
                return size.context("server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")
            }
            REP_INFO => {
                // NBD_INFO_EXPORT: u16 type 0, u64 size, u16 transmission flags.
                if let (Some([0, 0]), Some(sz)) = (data.get(..2), data.get(2..10)) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(sz);
                    size = Some(u64::from_be_bytes(b));
                }
            }
            _ => {}
        }
    }
    bail!("more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO")
}

/// A 28-byte transmission request header with an arbitrary magic.
pub fn request_with_magic(magic: u32, typ: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[..4].copy_from_slice(&magic.to_be_bytes());
    // h[4..6]: command flags, 0.
    h[6..8].copy_from_slice(&typ.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..].copy_from_slice(&len.to_be_bytes());
    h
}

/// A well-formed request header.
pub fn request(typ: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    request_with_magic(REQUEST_MAGIC, typ, handle, offset, len)
}

/// Reads a simple reply header; returns `(error, handle)`.
pub fn read_simple_reply(s: &mut impl Read) -> anyhow::Result<(u32, u64)> {
    let magic = read_u32(s).context("read reply magic")?;
    if magic != SIMPLE_REPLY_MAGIC {
        bail!("reply magic {magic:#x} is not the simple reply magic");
    }
    let error = read_u32(s)?;
    let handle = read_u64(s)?;
    Ok((error, handle))
}

/// Reads a 4 KiB READ at offset 0 through an established transmission phase.
pub fn read_block(s: &mut (impl Read + Write), handle: u64) -> anyhow::Result<Vec<u8>> {
    s.write_all(&request(CMD_READ, handle, 0, 4096))?;
    let (error, h) = read_simple_reply(s)?;
    if h != handle {
        bail!("reply for handle {h}, expected {handle}");
    }
    if error != 0 {
        bail!("READ failed with NBD error {error}");
    }
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data)?;
    Ok(data)
}

/// What the server did after we sent something it must refuse.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It closed (or reset) the connection.
    Closed,
    /// It sent bytes (e.g. an error reply); how many, up to 4 KiB.
    Replied(Vec<u8>),
    /// Nothing within the deadline, connection still open.
    Silent,
}

/// Half-closes nothing; reads what the server sends within `timeout`: EOF or reset →
/// [`Outcome::Closed`], data → [`Outcome::Replied`] (read until EOF or 4 KiB or a pause).
pub fn await_outcome(s: &mut TcpStream, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + crate::scaled(timeout);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let now = Instant::now();
        if now >= deadline || got.len() >= 4096 {
            break;
        }
        let step = (deadline - now).min(Duration::from_millis(500));
        if s.set_read_timeout(Some(step)).is_err() {
            return Outcome::Closed;
        }
        match s.read(&mut buf) {
            Ok(0) => {
                return if got.is_empty() {
                    Outcome::Closed
                } else {
                    Outcome::Replied(got)
                }
            }
            Ok(n) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !got.is_empty() {
                    break;
                }
            }
            Err(_) => {
                return if got.is_empty() {
                    Outcome::Closed
                } else {
                    Outcome::Replied(got)
                }
            }
        }
    }
    let _ = s.set_read_timeout(Some(crate::scaled(IO_TIMEOUT)));
    if got.is_empty() {
        Outcome::Silent
    } else {
        Outcome::Replied(got)
    }
}

/// Closes both directions, ignoring errors (the server may have closed already).
pub fn close(s: TcpStream) {
    let _ = s.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let r = request(CMD_WRITE, 0x0102_0304_0506_0708, 4096, 1 << 30);
        assert_eq!(r[..4], [0x25, 0x60, 0x95, 0x13]);
        assert_eq!(r[6..8], [0, 1]);
        assert_eq!(r[8..16], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(r[16..24], [0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(r[24..], [0x40, 0, 0, 0]);
    }
}
