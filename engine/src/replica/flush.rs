//! The Secondary's epoch flushes, merged into rounds.
//!
//! The Receiver core asks for a flush of the disk at the end of every epoch (before its
//! `P_BARRIER_ACK`, DRBD 9's order). At a few thousand epochs a second one flush per
//! epoch would queue flushes behind flushes, so the driver merges them: while one flush
//! of the disk is in flight, the requests that arrive wait, and the next flush — issued
//! when the running one ends — satisfies all of them at once. The rule that makes this
//! safe: a request is satisfied only by a flush *issued after* it was made (every write
//! of its epoch had completed by then, so that flush covers them). A request that joined
//! the flush already running would be acked with writes that flush may not cover.
//! `sim::tests::a_flush_round_that_takes_late_requests_is_caught` turns the rule off
//! (in this code, which the daemon and the simulator both run) and is caught.
//!
//! Bounds: the requests waiting are the Receiver's epochs in flight (≤ its
//! `max_epochs`); two vectors swap between rounds, so a round allocates nothing once
//! they have grown.

/// The merged flush rounds of one Secondary (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct FlushRounds {
    /// Requests made since the running round's flush was issued.
    waiting: Vec<u64>,
    /// The requests the running round's flush covers; empty: no round runs.
    round: Vec<u64>,
    /// Deliberate bug: a request joins the round already running.
    #[cfg(test)]
    pub(crate) sabotage_join_running: bool,
}

impl FlushRounds {
    /// The core asks for flush `token`. `true`: issue a flush of the disk now (a round
    /// starts with it); report its end to [`Self::round_done`].
    pub(crate) fn request(&mut self, token: u64) -> bool {
        #[cfg(test)]
        if self.sabotage_join_running && !self.round.is_empty() {
            self.round.push(token);
            return false;
        }
        self.waiting.push(token);
        self.next_round()
    }

    /// The running round's flush ended: the requests it satisfied, oldest first (report
    /// each to the core with the flush's result). Then call [`Self::next_round`].
    pub(crate) fn round_done(&mut self) -> std::vec::Drain<'_, u64> {
        self.round.drain(..)
    }

    /// Unless a round runs, the waiting requests become the next round: `true` when its
    /// flush must be issued now.
    pub(crate) fn next_round(&mut self) -> bool {
        if !self.round.is_empty() || self.waiting.is_empty() {
            return false;
        }
        std::mem::swap(&mut self.waiting, &mut self.round);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_made_during_a_flush_wait_for_the_next_one() {
        let mut f = FlushRounds::default();
        assert!(f.request(1), "the first request starts a round");
        assert!(!f.request(2) && !f.request(3), "later ones wait");
        assert_eq!(f.round_done().collect::<Vec<_>>(), vec![1]);
        assert!(f.next_round(), "the waiting ones are the next round");
        assert!(!f.next_round(), "one round at a time");
        assert!(!f.request(4));
        assert_eq!(f.round_done().collect::<Vec<_>>(), vec![2, 3]);
        assert!(f.next_round());
        assert_eq!(f.round_done().collect::<Vec<_>>(), vec![4]);
        assert!(!f.next_round(), "nothing waits");
        assert!(f.request(5), "idle: a request starts a round at once");
    }
}
