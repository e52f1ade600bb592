//! `enum drbd_packet`: every command value DRBD defines, with DRBD's names.
//!
//! A [`Command`] can only hold a value from the table, so an unknown value is caught where
//! the header is decoded ([`Command::from_u16`] names it in the error). Values that exist
//! but that a DRBD 8.4 peer never puts on the wire (DRBD 9 only, reserved, obsolete) are
//! known here and rejected one step later, when the payload layout is asked for.

use std::fmt;

use super::error::WireError;

/// A DRBD packet command (the `command` field of every header).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Command(u16);

/// Which socket carries a command in DRBD 8.4 (`drbd_cmd_handler[]` is the data socket,
/// `ack_receiver_tbl[]` the meta socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socket {
    /// The data socket, after the handshake.
    Data,
    /// The meta (ack) socket.
    Meta,
    /// Either socket (`P_DELAY_PROBE`).
    Both,
    /// Read by the handshake code, not the dispatch loops (`P_INITIAL_*`,
    /// `P_CONNECTION_FEATURES`, `P_AUTH_*`).
    Handshake,
    /// Not received by DRBD 8.4 at all.
    None,
}

macro_rules! commands {
    ($( $(#[$doc:meta])* $name:ident = $val:literal, $sock:ident, $v84:literal; )*) => {
        impl Command {
            $( $(#[$doc])* pub const $name: Command = Command($val); )*

            /// Every known command, in value order.
            pub const ALL: &'static [Command] = &[$(Command::$name),*];

            /// The command for a wire value; an error naming the value if DRBD has none.
            pub fn from_u16(value: u16) -> Result<Command, WireError> {
                match value {
                    $( $val => Ok(Command::$name), )*
                    other => Err(WireError::UnknownCommand(other)),
                }
            }

            /// DRBD's name for the command, e.g. `"P_DATA"`.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $( $val => stringify!($name), )*
                    // Unreachable: a Command only ever holds a value from the table.
                    _ => "P_UNKNOWN",
                }
            }

            /// The socket DRBD 8.4 reads this command from.
            pub fn socket(self) -> Socket {
                match self.0 {
                    $( $val => Socket::$sock, )*
                    _ => Socket::None,
                }
            }

            /// True if a DRBD 8.4 peer sends and receives this command.
            pub fn in_drbd84(self) -> bool {
                match self.0 {
                    $( $val => $v84, )*
                    _ => false,
                }
            }
        }
    };
}

commands! {
    /// Application write: `p_data` + (digest) + data.
    P_DATA = 0x00, Data, true;
    /// Answer to `P_DATA_REQUEST`: `p_data` + (digest) + data.
    P_DATA_REPLY = 0x01, Data, true;
    /// Answer to `P_RS_DATA_REQUEST`: `p_data` + (digest) + data.
    P_RS_DATA_REPLY = 0x02, Data, true;
    /// Closes an epoch: `p_barrier`.
    P_BARRIER = 0x03, Data, true;
    /// Plain bitmap words (little-endian).
    P_BITMAP = 0x04, Data, true;
    /// Named only; not in the 8.4 handler table.
    P_BECOME_SYNC_TARGET = 0x05, None, false;
    /// Named only; not in the 8.4 handler table.
    P_BECOME_SYNC_SOURCE = 0x06, None, false;
    /// A hint (the receiver sets TCP quickack); empty.
    P_UNPLUG_REMOTE = 0x07, Data, true;
    /// Read from the peer: `p_block_req`.
    P_DATA_REQUEST = 0x08, Data, true;
    /// Resync read request: `p_block_req`.
    P_RS_DATA_REQUEST = 0x09, Data, true;
    /// `p_rs_param` (agreed ≤ 88).
    P_SYNC_PARAM = 0x0a, Data, true;
    /// `p_protocol`.
    P_PROTOCOL = 0x0b, Data, true;
    /// `p_uuids`.
    P_UUIDS = 0x0c, Data, true;
    /// `p_sizes` (+ `o_qlim`).
    P_SIZES = 0x0d, Data, true;
    /// `p_state`.
    P_STATE = 0x0e, Data, true;
    /// `p_rs_uuid`.
    P_SYNC_UUID = 0x0f, Data, true;
    /// 64..=128 random bytes.
    P_AUTH_CHALLENGE = 0x10, Handshake, true;
    /// HMAC of the peer's challenge.
    P_AUTH_RESPONSE = 0x11, Handshake, true;
    /// `p_req_state`.
    P_STATE_CHG_REQ = 0x12, Data, true;
    /// Liveness request; empty.
    P_PING = 0x13, Meta, true;
    /// Liveness answer; empty.
    P_PING_ACK = 0x14, Meta, true;
    /// Protocol B ack: `p_block_ack`.
    P_RECV_ACK = 0x15, Meta, true;
    /// Protocol C ack: `p_block_ack`.
    P_WRITE_ACK = 0x16, Meta, true;
    /// Write ack that also sets the block in sync: `p_block_ack`.
    P_RS_WRITE_ACK = 0x17, Meta, true;
    /// Two-primaries conflict: `p_block_ack`.
    P_SUPERSEDED = 0x18, Meta, true;
    /// Write failed on the peer: `p_block_ack`.
    P_NEG_ACK = 0x19, Meta, true;
    /// Read failed on the peer: `p_block_ack`.
    P_NEG_DREPLY = 0x1a, Meta, true;
    /// Resync read failed on the peer: `p_block_ack`.
    P_NEG_RS_DREPLY = 0x1b, Meta, true;
    /// `p_barrier_ack`.
    P_BARRIER_ACK = 0x1c, Meta, true;
    /// `p_req_state_reply`.
    P_STATE_CHG_REPLY = 0x1d, Meta, true;
    /// Online-verify request: `p_block_req`.
    P_OV_REQUEST = 0x1e, Data, true;
    /// Online-verify reply: `p_block_req` + digest.
    P_OV_REPLY = 0x1f, Data, true;
    /// Online-verify result: `p_block_ack` (block_id be64 4711 / 4712).
    P_OV_RESULT = 0x20, Meta, true;
    /// Checksum-based resync request: `p_block_req` + digest.
    P_CSUM_RS_REQUEST = 0x21, Data, true;
    /// Checksums matched: `p_block_ack`.
    P_RS_IS_IN_SYNC = 0x22, Meta, true;
    /// `p_rs_param_89` / `p_rs_param_95`.
    P_SYNC_PARAM89 = 0x23, Data, true;
    /// `p_compressed_bm`.
    P_COMPRESSED_BITMAP = 0x24, Data, true;
    /// `p_delay_probe93`, ignored by the receiver.
    P_DELAY_PROBE = 0x27, Both, true;
    /// `p_block_desc` (Ahead mode).
    P_OUT_OF_SYNC = 0x28, Data, true;
    /// Resync request cancelled by the SyncSource: `p_block_ack`.
    P_RS_CANCEL = 0x29, Meta, true;
    /// Connection state change request: `p_req_state`.
    P_CONN_ST_CHG_REQ = 0x2a, Data, true;
    /// Connection state change reply: `p_req_state_reply`.
    P_CONN_ST_CHG_REPLY = 0x2b, Meta, true;
    /// Retry a conflicting write: `p_block_ack`.
    P_RETRY_WRITE = 0x2c, Meta, true;
    /// `p_protocol` while connected.
    P_PROTOCOL_UPDATE = 0x2d, Data, true;
    /// DRBD 9 two-phase commit.
    P_TWOPC_PREPARE = 0x2e, None, false;
    /// DRBD 9 two-phase commit.
    P_TWOPC_ABORT = 0x2f, None, false;
    /// DRBD 9 dagtag.
    P_DAGTAG = 0x30, None, false;
    /// Discard: `p_trim`, no data.
    P_TRIM = 0x31, Data, true;
    /// Thin resync request: `p_block_req`.
    P_RS_THIN_REQ = 0x32, Data, true;
    /// Thin resync answer (all zeroes): `p_block_desc`.
    P_RS_DEALLOCATED = 0x33, Data, true;
    /// Write-same: `p_wsame` + (digest) + one logical block. Linux ≥ 5.18 no longer
    /// handles it on receive: never send it to a kernel peer.
    P_WSAME = 0x34, Data, true;
    /// DRBD 9 two-phase commit (resize).
    P_TWOPC_PREP_RSZ = 0x35, None, false;
    /// Write-zeroes: `p_trim`, no data (needs `DRBD_FF_WZEROES`).
    P_ZEROES = 0x36, Data, true;
    /// DRBD 9.
    P_PEER_ACK = 0x40, None, false;
    /// DRBD 9.
    P_PEERS_IN_SYNC = 0x41, None, false;
    /// DRBD 9.
    P_UUIDS110 = 0x42, None, false;
    /// DRBD 9.
    P_PEER_DAGTAG = 0x43, None, false;
    /// DRBD 9.
    P_CURRENT_UUID = 0x44, None, false;
    /// DRBD 9.
    P_TWOPC_YES = 0x45, None, false;
    /// DRBD 9.
    P_TWOPC_NO = 0x46, None, false;
    /// DRBD 9.
    P_TWOPC_COMMIT = 0x47, None, false;
    /// DRBD 9.
    P_TWOPC_RETRY = 0x48, None, false;
    /// DRBD 9.
    P_CONFIRM_STABLE = 0x49, None, false;
    /// DRBD 9.
    P_RS_CANCEL_AHEAD = 0x4a, None, false;
    /// DRBD 9.
    P_DISCONNECT = 0x4b, None, false;
    /// DRBD 9.
    P_RS_DAGTAG_REQ = 0x4c, None, false;
    /// DRBD 9.
    P_RS_CSUM_DAGTAG_REQ = 0x4d, None, false;
    /// DRBD 9.
    P_RS_THIN_DAGTAG_REQ = 0x4e, None, false;
    /// DRBD 9.
    P_OV_DAGTAG_REQ = 0x4f, None, false;
    /// DRBD 9.
    P_OV_DAGTAG_REPLY = 0x50, None, false;
    /// DRBD 9.
    P_WRITE_ACK_IN_SYNC = 0x51, None, false;
    /// DRBD 9.
    P_RS_NEG_ACK = 0x52, None, false;
    /// DRBD 9.
    P_OV_RESULT_ID = 0x53, None, false;
    /// DRBD 9.
    P_RS_DEALLOCATED_ID = 0x54, None, false;
    /// DRBD 9.
    P_FLUSH_REQUESTS = 0x55, None, false;
    /// DRBD 9.
    P_FLUSH_FORWARD = 0x56, None, false;
    /// DRBD 9.
    P_FLUSH_REQUESTS_ACK = 0x57, None, false;
    /// DRBD 9.
    P_ENABLE_REPLICATION_NEXT = 0x58, None, false;
    /// DRBD 9.
    P_ENABLE_REPLICATION = 0x59, None, false;
    /// "Flag to test if (cmd > P_MAY_IGNORE)"; 8.4 does not implement ignoring.
    P_MAY_IGNORE = 0x100, None, false;
    /// End of the optional range in 8.4's header; never sent.
    P_MAX_OPT_CMD = 0x101, None, false;
    /// First packet on the meta socket; empty, always h80.
    P_INITIAL_META = 0xfff1, Handshake, true;
    /// First packet on the data socket; empty, always h80.
    P_INITIAL_DATA = 0xfff2, Handshake, true;
    /// `p_connection_features`, always h80.
    P_CONNECTION_FEATURES = 0xfffe, Handshake, true;
}

impl Command {
    /// The wire value.
    pub const fn value(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({:#06x})", self.name(), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_and_names_unknown_values() {
        assert_eq!(Command::ALL.len(), 84);
        for &c in Command::ALL {
            assert_eq!(Command::from_u16(c.value()), Ok(c));
            assert!(c.name().starts_with("P_"), "{c:?}");
        }
        assert_eq!(Command::P_DATA.name(), "P_DATA");
        assert_eq!(Command::P_CONNECTION_FEATURES.value(), 0xfffe);
        assert_eq!(Command::P_ZEROES.value(), 0x36);
        let e = Command::from_u16(0x25).expect_err("0x25 is reserved, not defined");
        assert_eq!(e.to_string(), "unknown DRBD command 0x0025");
        assert!(Command::from_u16(0x5a).is_err());
        assert!(!Command::P_TWOPC_PREPARE.in_drbd84());
        assert_eq!(Command::P_WRITE_ACK.socket(), Socket::Meta);
        assert_eq!(Command::P_DELAY_PROBE.socket(), Socket::Both);
    }
}
