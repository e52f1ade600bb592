//! DRBD packet headers, built by hand to send malformed traffic on purpose.
//!
//! Layouts from `shared/research/drbd-protocol.md` (all big-endian): h80 = `u32 magic
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
