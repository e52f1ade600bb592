//! Roles, connection states, disk states and the replication protocol, with DRBD's names
//! and numbers.
//!
//! The numbers are the ones DRBD packs into `P_STATE` (`union drbd_state`: role 2 bits,
//! conn 5 bits, disk 4 bits) and `P_PROTOCOL` (docs/drbd-reference.md §2.2), so the wire
//! codec converts with [`Role::from_u32`] / [`Role::as_u32`] and friends and never keeps a
//! second table. `Display` and serde use DRBD's spelling ("Primary", "WFConnection",
//! "UpToDate", "C") because that is what `drbdsetup status` prints and what operators and
//! orchestrators already parse.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// `Display`, `FromStr` and serde by name for an enum with `ALL` and `name()`: the
/// spelling operators and JSON readers see is the one place each value's name is written.
macro_rules! named_enum_impls {
    ($name:ident, $kind:literal) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name() == s)
                    .ok_or_else(|| UnknownName {
                        kind: $kind,
                        value: s.to_owned(),
                    })
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

pub mod change;
pub mod uuid;

/// A string that names none of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownName {
    /// Which enum was parsed ("role", "connection state", …).
    pub kind: &'static str,
    /// The string that did not match.
    pub value: String,
}

/// Declares a DRBD state enum with its numeric values and names, and the conversions every
/// such enum needs (numbers for the wire, names for humans and JSON).
macro_rules! drbd_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $kind:literal {
            $( $(#[$vmeta:meta])* $var:ident = $val:literal => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        pub enum $name {
            $( $(#[$vmeta])* $var = $val, )+
        }

        impl $name {
            /// Every value, in numeric order.
            pub const ALL: &'static [$name] = &[ $( $name::$var, )+ ];

            /// The value with DRBD's number `v`, or `None` for a number DRBD does not define.
            pub fn from_u32(v: u32) -> Option<Self> {
                match v {
                    $( $val => Some($name::$var), )+
                    _ => None,
                }
            }

            /// DRBD's number for this value.
            pub fn as_u32(self) -> u32 {
                self as u32
            }

            /// DRBD's name for this value (as `drbdsetup` prints it).
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$var => $text, )+
                }
            }
        }

        named_enum_impls!($name, $kind);
    };
}

drbd_enum! {
    /// A node's role for a resource (`enum drbd_role`).
    Role, "role" {
        /// Not known (the peer's role while disconnected).
        Unknown = 0 => "Unknown",
        /// Accepts writes from applications and replicates them.
        Primary = 1 => "Primary",
        /// Receives the Primary's writes; applications cannot write.
        Secondary = 2 => "Secondary",
    }
}

drbd_enum! {
    /// The state of the connection to a peer (`enum drbd_conns`).
    ConnState, "connection state" {
        /// Not trying to connect.
        StandAlone = 0 => "StandAlone",
        /// Tearing the connection down on request.
        Disconnecting = 1 => "Disconnecting",
        /// Transient state before trying to connect.
        Unconnected = 2 => "Unconnected",
        /// The peer did not answer in time.
        Timeout = 3 => "Timeout",
        /// A socket broke.
        BrokenPipe = 4 => "BrokenPipe",
        /// The network failed.
        NetworkFailure = 5 => "NetworkFailure",
        /// The peer sent something invalid.
        ProtocolError = 6 => "ProtocolError",
        /// The peer is tearing the connection down.
        TearDown = 7 => "TearDown",
        /// Listening and connecting, waiting for the peer.
        WFConnection = 8 => "WFConnection",
        /// Sockets are up; exchanging parameters.
        WFReportParams = 9 => "WFReportParams",
        /// Connected and in sync (or nothing to sync).
        Connected = 10 => "Connected",
        /// About to become SyncSource.
        StartingSyncS = 11 => "StartingSyncS",
        /// About to become SyncTarget.
        StartingSyncT = 12 => "StartingSyncT",
        /// Sending the bitmap, will become SyncSource.
        WFBitMapS = 13 => "WFBitMapS",
        /// Receiving the bitmap, will become SyncTarget.
        WFBitMapT = 14 => "WFBitMapT",
        /// Waiting for the sync UUID.
        WFSyncUUID = 15 => "WFSyncUUID",
        /// Resyncing, this node has the good data.
        SyncSource = 16 => "SyncSource",
        /// Resyncing, this node receives data.
        SyncTarget = 17 => "SyncTarget",
        /// Online verify, this node drives it.
        VerifyS = 18 => "VerifyS",
        /// Online verify, the peer drives it.
        VerifyT = 19 => "VerifyT",
        /// Resync paused, this node is the source.
        PausedSyncS = 20 => "PausedSyncS",
        /// Resync paused, this node is the target.
        PausedSyncT = 21 => "PausedSyncT",
        /// Congestion: replicating out-of-sync marks instead of data.
        Ahead = 22 => "Ahead",
        /// The peer is Ahead.
        Behind = 23 => "Behind",
    }
}

drbd_enum! {
    /// The state of a node's backing disk (`enum drbd_disk_state`).
    DiskState, "disk state" {
        /// No backing disk.
        Diskless = 0 => "Diskless",
        /// Reading metadata.
        Attaching = 1 => "Attaching",
        /// An I/O error; being detached.
        Failed = 2 => "Failed",
        /// Attached while the connection decides which data is newer.
        Negotiating = 3 => "Negotiating",
        /// Data may be inconsistent (a SyncTarget, or never synced).
        Inconsistent = 4 => "Inconsistent",
        /// Consistent but known to be older than the peer's.
        Outdated = 5 => "Outdated",
        /// The peer's disk state is not known.
        DUnknown = 6 => "DUnknown",
        /// Consistent; whether it is the newest is not known.
        Consistent = 7 => "Consistent",
        /// Consistent and up to date.
        UpToDate = 8 => "UpToDate",
    }
}

drbd_enum! {
    /// When a write counts as replicated (`wire_protocol` in `P_PROTOCOL`).
    Protocol, "protocol" {
        /// Asynchronous: local disk done and the data handed to the network.
        A = 1 => "A",
        /// Memory-synchronous: local disk done and the peer received the data (`P_RECV_ACK`).
        B = 2 => "B",
        /// Synchronous: local disk done and the peer's disk has it (`P_WRITE_ACK`).
        C = 3 => "C",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_drbd() {
        assert_eq!(Role::Primary.as_u32(), 1);
        assert_eq!(Role::Secondary.as_u32(), 2);
        assert_eq!(ConnState::WFConnection.as_u32(), 8);
        assert_eq!(ConnState::Connected.as_u32(), 10);
        assert_eq!(ConnState::Behind.as_u32(), 23);
        assert_eq!(ConnState::ALL.len(), 24);
        assert_eq!(DiskState::DUnknown.as_u32(), 6);
        assert_eq!(DiskState::UpToDate.as_u32(), 8);
        assert_eq!(DiskState::ALL.len(), 9);
        assert_eq!(Protocol::A.as_u32(), 1);
        assert_eq!(Protocol::C.as_u32(), 3);
    }

    #[test]
    fn numbers_round_trip_and_unknown_numbers_are_refused() {
        for v in 0..32 {
            match ConnState::from_u32(v) {
                Some(s) => assert_eq!(s.as_u32(), v),
                None => assert!(v > 23),
            }
        }
        assert_eq!(Role::from_u32(3), None);
        assert_eq!(DiskState::from_u32(9), None);
        assert_eq!(Protocol::from_u32(0), None);
        assert_eq!(Protocol::from_u32(4), None);
        // The all-values tables are in numeric order, without gaps.
        for (i, s) in DiskState::ALL.iter().enumerate() {
            assert_eq!(s.as_u32() as usize, i);
        }
    }

    #[test]
    fn names_are_drbds() {
        assert_eq!(ConnState::WFConnection.to_string(), "WFConnection");
        assert_eq!(ConnState::WFBitMapS.to_string(), "WFBitMapS");
        assert_eq!(DiskState::UpToDate.to_string(), "UpToDate");
        assert_eq!(Role::Primary.to_string(), "Primary");
        assert_eq!(Protocol::B.to_string(), "B");
        assert_eq!(
            "SyncTarget".parse::<ConnState>().unwrap(),
            ConnState::SyncTarget
        );
        let err = "uptodate".parse::<DiskState>().unwrap_err();
        assert_eq!(err.to_string(), "unknown disk state \"uptodate\"");
    }

    #[test]
    fn serde_uses_names() {
        assert_eq!(
            serde_json::to_string(&DiskState::Inconsistent).unwrap(),
            "\"Inconsistent\""
        );
        assert_eq!(serde_json::to_string(&Protocol::C).unwrap(), "\"C\"");
        let r: Role = serde_json::from_str("\"Secondary\"").unwrap();
        assert_eq!(r, Role::Secondary);
        assert!(serde_json::from_str::<Protocol>("\"D\"").is_err());
        assert!(serde_json::from_str::<Protocol>("3").is_err());
    }
}
