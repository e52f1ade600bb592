//! The peer's answers to this node's replicated writes (meta stream): `P_RECV_ACK`,
//! `P_WRITE_ACK` / `P_RS_WRITE_ACK`, `P_NEG_ACK` and `P_BARRIER_ACK`, fed to the Primary
//! core ([`Node::peer_ack`], [`Node::barrier_ack`]); the driver drains the actions they
//! free (completions, the next writes).
//!
//! One rule lives here besides the dispatch: a `P_NEG_ACK` on a SyncTarget Primary means
//! the peer lacks that range and this node has the newer data — the core keeps its bits
//! set and the running target is told ([`crate::resync::Target::peer_lacks`]): it neither
//! fetches the range nor reads it from the peer. Before this module only the daemon told
//! the target; the simulator's Primary fed its core directly.
//!
//! Errors are the peer's (an ack while this node is Secondary, a command that is not an
//! ack, an id the core does not know): operating errors, on which the driver drops the
//! connection, never a panic.

use super::Node;
use crate::state::Role;
use crate::wire::Command;

impl Node {
    /// The peer's ack `cmd` of this node's write `block_id` (see the module docs).
    pub(crate) fn peer_ack(&mut self, cmd: Command, block_id: u64) -> Result<(), String> {
        self.primary_only(cmd)?;
        let r = match cmd {
            Command::P_RECV_ACK => self.primary.peer_recv_ack(block_id),
            Command::P_WRITE_ACK | Command::P_RS_WRITE_ACK => self.primary.peer_write_ack(block_id),
            Command::P_NEG_ACK => self
                .primary
                .peer_neg_ack(block_id)
                .map(|(sector, len)| self.runs.peer_lacks(sector, len)),
            other => return Err(format!("unexpected {} on the meta stream", other.name())),
        };
        r.map_err(|e| format!("{}: {e}", cmd.name()))
    }

    /// The peer's `P_BARRIER_ACK` of epoch `nr` with `set_size` writes.
    pub(crate) fn barrier_ack(&mut self, nr: u32, set_size: u32) -> Result<(), String> {
        self.primary_only(Command::P_BARRIER_ACK)?;
        self.primary
            .barrier_ack(nr, set_size)
            .map_err(|e| format!("P_BARRIER_ACK: {e}"))
    }

    fn primary_only(&self, cmd: Command) -> Result<(), String> {
        if self.role == Role::Primary {
            Ok(())
        } else {
            Err(format!("{} received while Secondary", cmd.name()))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::replica::{Action, Node};
    use crate::request::WriteKind;
    use crate::resync::{TargetConfig, TickInput};
    use crate::state::uuid::UuidSet;
    use crate::state::{DiskState, Role};
    use crate::wire::Command;

    const SECTORS: u64 = 2048;

    fn primary() -> Node {
        let mut n = Node::for_test(SECTORS, UuidSet::default(), DiskState::UpToDate);
        n.role = Role::Primary;
        n
    }

    #[test]
    fn acks_while_secondary_and_non_acks_are_the_peer_s_errors() {
        let mut n = primary();
        n.role = Role::Secondary;
        let e = n.peer_ack(Command::P_WRITE_ACK, 1).unwrap_err();
        assert!(e.contains("while Secondary"), "{e}");
        assert!(n.barrier_ack(1, 1).unwrap_err().contains("while Secondary"));
        n.role = Role::Primary;
        let e = n.peer_ack(Command::P_DATA, 1).unwrap_err();
        assert!(e.contains("unexpected P_DATA"), "{e}");
        assert!(
            n.peer_ack(Command::P_WRITE_ACK, 77).is_err(),
            "an unknown id"
        );
    }

    /// A SyncTarget Primary's write refused by the peer: the bits stay and the target
    /// learns that the peer lacks the range (it does not fetch it from the peer).
    #[test]
    fn a_neg_ack_on_a_sync_target_primary_tells_the_target() {
        let mut n = primary();
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        n.primary.connected().unwrap();
        n.primary.out_of_sync_mut().mark(0, 8192);
        n.start_target(TargetConfig::new(SECTORS), &TickInput::default())
            .unwrap();
        let remote = |n: &Node| {
            let t = n.runs.target().unwrap();
            t.must_read_remotely(n.primary.out_of_sync(), 0, 4096)
        };
        assert!(remote(&n), "block 0 is still to be fetched");
        n.primary.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        let mut out = Vec::new();
        n.drain(&mut out);
        let block_id = out
            .iter()
            .find_map(|a| match a {
                Action::SendWrite { block_id, .. } => Some(*block_id),
                _ => None,
            })
            .unwrap();
        n.peer_ack(Command::P_NEG_ACK, block_id).unwrap();
        assert!(n.primary.out_of_sync().is_set(0), "the bits stay");
        assert!(!remote(&n), "the target knows the peer lacks block 0");
    }
}
