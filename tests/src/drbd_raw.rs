//! DRBD packet headers, built by hand to send malformed traffic on purpose.
//!
//! Layouts from `docs/protocol.md` and DRBD's `drbd_protocol.h` (all big-endian): h80 = `u32 magic
//! 0x83740267, u16 command, u16 length` (8 bytes), h95 = `u16 magic 0x835a, u16 command,
//! u32 length` (8 bytes), h100 = `u32 magic 0x8620ec20, u16 volume, u16 command, u32
//! length, u32 pad` (16 bytes). The first packet on a new socket is an h80
//! `P_INITIAL_DATA` (0xfff2) or `P_INITIAL_META` (0xfff1) with an empty payload.

/// `DRBD_MAGIC`, the h80 magic.
pub const H80_MAGIC: u32 = 0x8374_0267;
/// `DRBD_MAGIC_BIG`, the h95 magic.
pub const H95_MAGIC: u16 = 0x835a;
/// `DRBD_MAGIC_100`, the h100 magic.
pub const H100_MAGIC: u32 = 0x8620_ec20;
/// First packet on the data socket.
pub const P_INITIAL_DATA: u16 = 0xfff2;
/// First packet on the meta socket.
pub const P_INITIAL_META: u16 = 0xfff1;
/// Feature negotiation, the first real packet on the data socket.
pub const P_CONNECTION_FEATURES: u16 = 0xfffe;

/// `P_DATA`.
pub const P_DATA: u16 = 0x0000;
/// Lowest protocol version tandem and DRBD 8.4 speak.
pub const PROTOCOL_MIN: u32 = 86;
/// Highest protocol version of DRBD 8.4.
pub const PROTOCOL_MAX: u32 = 101;
/// Size of `p_connection_features`.
pub const FEATURES_LEN: u16 = 72;

/// An `h80 P_CONNECTION_FEATURES` packet offering `min..=max` with `flags`.
pub fn connection_features(min: u32, max: u32, flags: u32) -> Vec<u8> {
    let mut p = h80(P_CONNECTION_FEATURES, FEATURES_LEN).to_vec();
    p.extend_from_slice(&min.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    p.extend_from_slice(&max.to_be_bytes());
    p.resize(8 + usize::from(FEATURES_LEN), 0);
    p
}

/// Plays the connecting side of DRBD's handshake up to the agreed protocol version, like a
/// kernel DRBD 8.4 peer: a data socket (`P_INITIAL_DATA`), a meta socket
/// (`P_INITIAL_META`), then `P_CONNECTION_FEATURES` both ways on the data socket. Returns
/// `(data, meta, the daemon's protocol_max)`; from there on the daemon expects h100
/// headers. Every read and write times out after 10 s (scaled).
pub fn connect_past_features(
    addr: std::net::SocketAddr,
) -> anyhow::Result<(std::net::TcpStream, std::net::TcpStream, u32)> {
    use anyhow::{bail, Context};
    use std::io::{Read, Write};
    let open = |first: u16| -> anyhow::Result<std::net::TcpStream> {
        let t = crate::scaled(std::time::Duration::from_secs(10));
        let mut s = std::net::TcpStream::connect_timeout(&addr, t)
            .with_context(|| format!("connect to {addr}"))?;
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))?;
        s.set_nodelay(true)?;
        s.write_all(&h80(first, 0))?;
        Ok(s)
    };
    let mut data = open(P_INITIAL_DATA)?;
    let meta = open(P_INITIAL_META)?;
    data.write_all(&connection_features(PROTOCOL_MIN, PROTOCOL_MAX, 0))?;
    let mut reply = [0u8; 8 + FEATURES_LEN as usize];
    data.read_exact(&mut reply)
        .context("read the daemon's P_CONNECTION_FEATURES")?;
    if reply.get(..8) != Some(h80(P_CONNECTION_FEATURES, FEATURES_LEN).as_slice()) {
        bail!("unexpected reply header {:02x?}", reply.get(..8));
    }
    let mut max = [0u8; 4];
    max.copy_from_slice(reply.get(16..20).unwrap_or(&[0; 4]));
    Ok((data, meta, u32::from_be_bytes(max)))
}

/// An h80 header.
pub fn h80(command: u16, length: u16) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&H80_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&command.to_be_bytes());
    h[6..].copy_from_slice(&length.to_be_bytes());
    h
}

/// An h95 header.
pub fn h95(command: u16, length: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..2].copy_from_slice(&H95_MAGIC.to_be_bytes());
    h[2..4].copy_from_slice(&command.to_be_bytes());
    h[4..].copy_from_slice(&length.to_be_bytes());
    h
}

/// An h100 header.
pub fn h100(volume: u16, command: u16, length: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&H100_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&volume.to_be_bytes());
    h[6..8].copy_from_slice(&command.to_be_bytes());
    h[8..12].copy_from_slice(&length.to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_layout() {
        let p = connection_features(86, 101, 0x9);
        assert_eq!(p.len(), 80);
        assert_eq!(p[..8], h80(P_CONNECTION_FEATURES, 72));
        assert_eq!(p[8..12], 86u32.to_be_bytes());
        assert_eq!(p[12..16], 9u32.to_be_bytes());
        assert_eq!(p[16..20], 101u32.to_be_bytes());
        assert!(p[20..].iter().all(|&b| b == 0));
    }

    #[test]
    fn headers_match_the_captured_bytes() {
        // The first packet of a kernel DRBD 8.4 data socket (data/drbd84-captures).
        assert_eq!(
            h80(P_INITIAL_DATA, 0),
            [0x83, 0x74, 0x02, 0x67, 0xff, 0xf2, 0, 0]
        );
        assert_eq!(h95(0, 0x8000_0000), [0x83, 0x5a, 0, 0, 0x80, 0, 0, 0]);
        assert_eq!(
            h100(0, 0x0021, 4096),
            [0x86, 0x20, 0xec, 0x20, 0, 0, 0, 0x21, 0, 0, 0x10, 0, 0, 0, 0, 0]
        );
    }
}
