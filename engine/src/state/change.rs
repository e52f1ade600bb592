//! DRBD 8.4's cluster-wide state changes: the rules that decide a peer's
//! `P_STATE_CHG_REQ` / `P_CONN_ST_CHG_REQ`, and the reply codes both ways.
//!
//! A change that matters to both nodes (becoming Primary, starting a resync or an online
//! verify, leaving the connection) is not made alone: the node that wants it sends the
//! requested bits (`mask`, `val`, two `union drbd_state` words in its own view) and
//! waits for `P_STATE_CHG_REPLY` (`P_CONN_ST_CHG_REPLY` for connection-wide requests,
//! protocol ≥ 100) with an `enum drbd_state_rv` code: ≥ 1 success, < 0 the reason it
//! was refused. The receiver first mirrors the words into its own view
//! ([`convert_state`]: role ↔ peer, disk ↔ pdsk, StartingSyncS ↔ StartingSyncT,
//! VerifyS → VerifyT, Disconnecting → TearDown) and then checks the state it would be in
//! (DRBD's `receive_req_state`, `convert_state`, `is_valid_state`,
//! `is_valid_soft_transition`; the codes are `enum drbd_state_rv` of `linux/drbd.h`).
//!
//! Crossing requests: when both nodes ask at the same moment, the node that holds
//! `RESOLVE_CONFLICTS` (it accepted the meta socket) refuses the peer's request with
//! [`StateRv::ConcurrentStChg`] while its own is pending, and the other node answers
//! the request normally. So of two `primary` commands given to both nodes at the same
//! instant exactly one succeeds.
//!
//! This module is pure: [`decide`] takes what this node knows and the request and says
//! what to answer and what to do; the volume driver sends and applies it.

use super::{ConnState, DiskState, Role};
use crate::wire::StateBits;

/// `enum drbd_state_rv` (`linux/drbd.h`), the reply to a state change request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateRv {
    /// `SS_SUCCESS` (1).
    Success,
    /// `SS_TWO_PRIMARIES` (−1).
    TwoPrimaries,
    /// `SS_NO_UP_TO_DATE_DISK` (−2).
    NoUpToDateDisk,
    /// `SS_NO_LOCAL_DISK` (−4).
    NoLocalDisk,
    /// `SS_NO_REMOTE_DISK` (−5).
    NoRemoteDisk,
    /// `SS_RESYNC_RUNNING` (−8).
    ResyncRunning,
    /// `SS_CW_FAILED_BY_PEER` (−10).
    CwFailedByPeer,
    /// `SS_DEVICE_IN_USE` (−12).
    DeviceInUse,
    /// `SS_NEED_CONNECTION` (−15).
    NeedConnection,
    /// `SS_NOT_SUPPORTED` (−17).
    NotSupported,
    /// `SS_IN_TRANSIENT_STATE` (−18).
    InTransientState,
    /// `SS_CONCURRENT_ST_CHG` (−19).
    ConcurrentStChg,
    /// Any other code: ≥ 2 counts as success (`SS_NOTHING_TO_DO`, `SS_CW_SUCCESS`, …).
    Other(i32),
}

impl StateRv {
    /// The wire code.
    pub fn code(self) -> i32 {
        match self {
            StateRv::Success => 1,
            StateRv::TwoPrimaries => -1,
            StateRv::NoUpToDateDisk => -2,
            StateRv::NoLocalDisk => -4,
            StateRv::NoRemoteDisk => -5,
            StateRv::ResyncRunning => -8,
            StateRv::CwFailedByPeer => -10,
            StateRv::DeviceInUse => -12,
            StateRv::NeedConnection => -15,
            StateRv::NotSupported => -17,
            StateRv::InTransientState => -18,
            StateRv::ConcurrentStChg => -19,
            StateRv::Other(c) => c,
        }
    }

    /// The value of a wire code (any i32 is accepted: an unknown code is kept as is).
    pub fn from_code(code: i32) -> StateRv {
        [
            StateRv::Success,
            StateRv::TwoPrimaries,
            StateRv::NoUpToDateDisk,
            StateRv::NoLocalDisk,
            StateRv::NoRemoteDisk,
            StateRv::ResyncRunning,
            StateRv::CwFailedByPeer,
            StateRv::DeviceInUse,
            StateRv::NeedConnection,
            StateRv::NotSupported,
            StateRv::InTransientState,
            StateRv::ConcurrentStChg,
        ]
        .into_iter()
        .find(|r| r.code() == code)
        .unwrap_or(StateRv::Other(code))
    }

    /// DRBD counts every code ≥ 1 as success.
    pub fn is_success(self) -> bool {
        self.code() >= 1
    }

    /// DRBD's text for the code (`drbd_set_st_err_str`), for operators.
    pub fn describe(self) -> String {
        match self {
            StateRv::Success => "State change was successful".into(),
            StateRv::TwoPrimaries => "Multiple primaries not allowed by config".into(),
            StateRv::NoUpToDateDisk => "Need access to UpToDate data".into(),
            StateRv::NoLocalDisk => "Can not resync without local disk".into(),
            StateRv::NoRemoteDisk => "Can not resync without remote disk".into(),
            StateRv::ResyncRunning => "Can not start OV/resync since it is already active".into(),
            StateRv::CwFailedByPeer => "State change was refused by peer node".into(),
            StateRv::DeviceInUse => "Device is held open by someone".into(),
            StateRv::NeedConnection => "Need a connection to start verify or resync".into(),
            StateRv::NotSupported => "Peer does not support protocol".into(),
            StateRv::InTransientState => "In transient state, retry after next state change".into(),
            StateRv::ConcurrentStChg => "Concurrent state changes detected and aborted".into(),
            StateRv::Other(c) if c >= 1 => format!("State change was successful ({c})"),
            StateRv::Other(c) => format!("State change failed ({c})"),
        }
    }
}

/// A `union drbd_state` word seen from the other node (`convert_state` of DRBD 8.4):
/// role ↔ peer, disk ↔ pdsk, the connection states a request may carry mapped to their
/// mirror (any other connection value becomes 0), `peer_isp` = `aftr_isp | user_isp`.
pub(crate) fn convert_state(word: u32) -> u32 {
    let s = StateBits::unpack(word);
    let c = |c: ConnState| u8::try_from(c.as_u32()).unwrap_or(0);
    let conn = match ConnState::from_u32(u32::from(s.conn)) {
        Some(ConnState::WFReportParams) => c(ConnState::WFReportParams),
        Some(ConnState::Connected) => c(ConnState::Connected),
        Some(ConnState::StartingSyncS) => c(ConnState::StartingSyncT),
        Some(ConnState::StartingSyncT) => c(ConnState::StartingSyncS),
        Some(ConnState::Disconnecting) => c(ConnState::TearDown),
        Some(ConnState::VerifyS) => c(ConnState::VerifyT),
        // C_MASK: the mask word's "all connection bits".
        _ if s.conn == 0x1f => 0x1f,
        _ => 0,
    };
    let mirrored = StateBits {
        role: s.peer,
        peer: s.role,
        conn,
        disk: s.pdsk,
        pdsk: s.disk,
        peer_isp: s.aftr_isp | s.user_isp,
        ..s
    };
    mirrored.pack().unwrap_or(0)
}

/// What this node knows when a request arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    /// This node's role (Primary also while its own promotion is being applied).
    pub role: Role,
    /// This node's disk.
    pub disk: DiskState,
    /// The connection state.
    pub conn: ConnState,
    /// The peer's disk as last reported.
    pub peer_disk: DiskState,
    /// This node is waiting for the reply to a request of its own.
    pub own_request_pending: bool,
    /// This node holds `RESOLVE_CONFLICTS` (it accepted the meta socket).
    pub resolve_conflicts: bool,
}

/// What granting a request makes this node do (besides the reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grant {
    /// The peer becomes this role.
    pub peer_role: Option<Role>,
    /// The peer's disk becomes this state.
    pub peer_disk: Option<DiskState>,
    /// The peer invalidated itself: this node is the source of a full resync (DRBD's
    /// StartingSyncS).
    pub sync_source: bool,
    /// The peer asked this node to be the target of a full resync (its
    /// `invalidate-remote`; DRBD's StartingSyncT here).
    pub sync_target: bool,
    /// The peer starts an online verify (VerifyT here).
    pub verify_target: bool,
    /// The peer leaves the connection (TearDown here).
    pub peer_leaves: bool,
}

/// The answer to a peer's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The reply code.
    pub rv: StateRv,
    /// What to apply when `rv` is a success.
    pub grant: Grant,
}

/// Decides a peer's `P_STATE_CHG_REQ` / `P_CONN_ST_CHG_REQ` (`mask`, `val` as the peer
/// sent them, in its view).
pub fn decide(local: &Local, mask: u32, val: u32) -> Decision {
    let refuse = |rv| Decision {
        rv,
        grant: Grant::default(),
    };
    if local.own_request_pending && local.resolve_conflicts {
        return refuse(StateRv::ConcurrentStChg);
    }
    let (m, v) = (
        StateBits::unpack(convert_state(mask)),
        StateBits::unpack(convert_state(val)),
    );
    let mut grant = Grant::default();
    if m.role != 0 && Role::from_u32(u32::from(v.role)) != Some(local.role) {
        // The peer may not change this node's role (DRBD 8.4 never asks).
        return refuse(StateRv::NotSupported);
    }
    if m.disk != 0 && DiskState::from_u32(u32::from(v.disk)) != Some(local.disk) {
        return refuse(StateRv::NotSupported);
    }
    if m.pdsk != 0 {
        grant.peer_disk = DiskState::from_u32(u32::from(v.pdsk));
    }
    let peer_disk = grant.peer_disk.unwrap_or(local.peer_disk);
    if m.peer != 0 {
        let role = Role::from_u32(u32::from(v.peer)).unwrap_or(Role::Unknown);
        if role == Role::Primary {
            if local.role == Role::Primary {
                return refuse(StateRv::TwoPrimaries);
            }
            // The peer serves from its own disk or reads ours (a SyncTarget Primary).
            if peer_disk < DiskState::Inconsistent
                || (peer_disk < DiskState::UpToDate && local.disk < DiskState::UpToDate)
            {
                return refuse(StateRv::NoUpToDateDisk);
            }
        }
        grant.peer_role = Some(role);
    }
    if m.conn != 0 {
        let conn = ConnState::from_u32(u32::from(v.conn));
        let busy = local.conn != ConnState::Connected;
        match conn {
            Some(ConnState::TearDown) => grant.peer_leaves = true,
            Some(ConnState::StartingSyncS) => {
                if busy {
                    return refuse(StateRv::ResyncRunning);
                }
                if local.disk < DiskState::UpToDate {
                    return refuse(StateRv::NoUpToDateDisk);
                }
                grant.sync_source = true;
            }
            Some(ConnState::StartingSyncT) => {
                if busy {
                    return refuse(StateRv::ResyncRunning);
                }
                if peer_disk < DiskState::UpToDate {
                    return refuse(StateRv::NoUpToDateDisk);
                }
                if local.disk < DiskState::Inconsistent {
                    return refuse(StateRv::NoLocalDisk);
                }
                if local.role == Role::Primary {
                    // tandem invalidates only a Secondary (`invalidate`).
                    return refuse(StateRv::NotSupported);
                }
                grant.sync_target = true;
            }
            Some(ConnState::VerifyT) => {
                if busy {
                    return refuse(StateRv::ResyncRunning);
                }
                if local.disk < DiskState::UpToDate || peer_disk < DiskState::UpToDate {
                    return refuse(StateRv::NoUpToDateDisk);
                }
                grant.verify_target = true;
            }
            Some(ConnState::WFReportParams | ConnState::Connected) => {}
            _ => return refuse(StateRv::NotSupported),
        }
    }
    Decision {
        rv: StateRv::Success,
        grant,
    }
}

/// The request of this node to become Primary (`mask`, `val` in its own view); a forced
/// promotion also declares its disk UpToDate (DRBD's `primary --force`).
pub fn promote_request(force: bool) -> (u32, u32) {
    let primary = u8::try_from(Role::Primary.as_u32()).unwrap_or(0);
    let uptodate = u8::try_from(DiskState::UpToDate.as_u32()).unwrap_or(0);
    let mask = StateBits {
        role: 0x3,
        disk: if force { 0xf } else { 0 },
        ..StateBits::default()
    };
    let val = StateBits {
        role: primary,
        disk: if force { uptodate } else { 0 },
        ..StateBits::default()
    };
    (mask.pack().unwrap_or(0), val.pack().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(role: Role, peer: Role, conn: u8, disk: DiskState, pdsk: DiskState) -> u32 {
        let b = |v: u32| u8::try_from(v).unwrap_or(0);
        StateBits {
            role: b(role.as_u32()),
            peer: b(peer.as_u32()),
            conn,
            disk: b(disk.as_u32()),
            pdsk: b(pdsk.as_u32()),
            ..StateBits::default()
        }
        .pack()
        .unwrap_or(0)
    }

    fn local() -> Local {
        Local {
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            conn: ConnState::Connected,
            peer_disk: DiskState::UpToDate,
            own_request_pending: false,
            resolve_conflicts: false,
        }
    }

    fn conn(c: ConnState) -> u8 {
        u8::try_from(c.as_u32()).unwrap_or(0)
    }

    #[test]
    fn codes_round_trip_and_unknown_codes_are_kept() {
        for c in -30..5 {
            assert_eq!(StateRv::from_code(c).code(), c);
        }
        assert!(StateRv::from_code(3).is_success());
        assert!(!StateRv::from_code(-19).is_success());
        assert_eq!(StateRv::from_code(-19), StateRv::ConcurrentStChg);
        assert!(StateRv::Other(-99).describe().contains("-99"));
    }

    #[test]
    fn convert_state_mirrors_roles_disks_and_sync_states() {
        let w = word(
            Role::Primary,
            Role::Secondary,
            conn(ConnState::StartingSyncT),
            DiskState::Inconsistent,
            DiskState::UpToDate,
        );
        let m = StateBits::unpack(convert_state(w));
        assert_eq!(u32::from(m.role), Role::Secondary.as_u32());
        assert_eq!(u32::from(m.peer), Role::Primary.as_u32());
        assert_eq!(u32::from(m.conn), ConnState::StartingSyncS.as_u32());
        assert_eq!(u32::from(m.disk), DiskState::UpToDate.as_u32());
        assert_eq!(u32::from(m.pdsk), DiskState::Inconsistent.as_u32());
        let v = StateBits::unpack(convert_state(word(
            Role::Unknown,
            Role::Unknown,
            conn(ConnState::VerifyS),
            DiskState::Diskless,
            DiskState::Diskless,
        )));
        assert_eq!(u32::from(v.conn), ConnState::VerifyT.as_u32());
        // The mask's C_MASK stays all ones; a connection state a request never carries
        // becomes 0.
        assert_eq!(StateBits::unpack(convert_state(0x1f << 4)).conn, 0x1f);
        let x = StateBits::unpack(convert_state(u32::from(conn(ConnState::SyncSource)) << 4));
        assert_eq!(x.conn, 0);
    }

    #[test]
    fn a_promotion_request_is_granted_unless_this_node_is_primary() {
        let (mask, val) = promote_request(false);
        let d = decide(&local(), mask, val);
        assert_eq!(d.rv, StateRv::Success);
        assert_eq!(d.grant.peer_role, Some(Role::Primary));
        let primary = Local {
            role: Role::Primary,
            ..local()
        };
        assert_eq!(decide(&primary, mask, val).rv, StateRv::TwoPrimaries);
    }

    #[test]
    fn crossing_requests_are_refused_only_by_the_conflict_resolver() {
        let (mask, val) = promote_request(false);
        let pending = Local {
            own_request_pending: true,
            ..local()
        };
        // The other side answers normally: its own request will be refused by us.
        assert_eq!(decide(&pending, mask, val).rv, StateRv::Success);
        let resolver = Local {
            resolve_conflicts: true,
            ..pending
        };
        assert_eq!(decide(&resolver, mask, val).rv, StateRv::ConcurrentStChg);
    }

    #[test]
    fn a_peer_without_good_data_may_not_become_primary() {
        let (mask, val) = promote_request(false);
        let l = Local {
            peer_disk: DiskState::Inconsistent,
            disk: DiskState::Inconsistent,
            ..local()
        };
        assert_eq!(decide(&l, mask, val).rv, StateRv::NoUpToDateDisk);
        // Its forced promotion declares its disk UpToDate.
        let (mask, val) = promote_request(true);
        let d = decide(&l, mask, val);
        assert_eq!(d.rv, StateRv::Success);
        assert_eq!(d.grant.peer_disk, Some(DiskState::UpToDate));
        // A peer whose disk failed may not, even forced by us reading its state.
        let failed = Local {
            peer_disk: DiskState::Failed,
            ..local()
        };
        assert_eq!(
            decide(&failed, promote_request(false).0, promote_request(false).1).rv,
            StateRv::NoUpToDateDisk
        );
    }

    #[test]
    fn invalidate_verify_and_disconnect_requests() {
        let req = |c: ConnState| {
            let mask = StateBits {
                conn: 0x1f,
                ..StateBits::default()
            };
            let val = StateBits {
                conn: conn(c),
                ..StateBits::default()
            };
            (mask.pack().unwrap_or(0), val.pack().unwrap_or(0))
        };
        // The peer's invalidate (StartingSyncT there) makes this node the source.
        let (m, v) = req(ConnState::StartingSyncT);
        assert!(decide(&local(), m, v).grant.sync_source);
        let inconsistent = Local {
            disk: DiskState::Inconsistent,
            ..local()
        };
        assert_eq!(decide(&inconsistent, m, v).rv, StateRv::NoUpToDateDisk);
        // Its invalidate-remote makes this node the target.
        let (m, v) = req(ConnState::StartingSyncS);
        assert!(decide(&local(), m, v).grant.sync_target);
        let syncing = Local {
            conn: ConnState::SyncSource,
            ..local()
        };
        assert_eq!(decide(&syncing, m, v).rv, StateRv::ResyncRunning);
        let (m, v) = req(ConnState::VerifyS);
        assert!(decide(&local(), m, v).grant.verify_target);
        let (m, v) = req(ConnState::Disconnecting);
        assert!(decide(&local(), m, v).grant.peer_leaves);
        let (m, v) = req(ConnState::SyncSource);
        assert_eq!(decide(&local(), m, v).rv, StateRv::NotSupported);
    }

    #[test]
    fn the_peer_may_not_change_this_nodes_role_or_disk() {
        // The peer asking "peer = Secondary" means this node's role.
        let mask = StateBits {
            peer: 0x3,
            ..StateBits::default()
        };
        let val = StateBits {
            peer: u8::try_from(Role::Primary.as_u32()).unwrap_or(0),
            ..StateBits::default()
        };
        let d = decide(&local(), mask.pack().unwrap_or(0), val.pack().unwrap_or(0));
        assert_eq!(d.rv, StateRv::NotSupported);
    }

    #[test]
    fn hostile_words_never_panic() {
        for i in 0..2000u32 {
            let w = i.wrapping_mul(0x9e37_79b9);
            let _ = convert_state(w);
            let _ = decide(&local(), w, w.rotate_left(7));
        }
    }
}
