//! How long the oldest write has waited for the peer: the clock side of DRBD's
//! `request_timer_fn`, kept in the driver because the request core reads no clocks.
//!
//! A write is recorded when its `P_DATA` (or `P_TRIM`/`P_ZEROES`) is queued to the peer
//! and forgotten when the core retires it (acked and its epoch barrier-acked, or the
//! connection lost). Writes retire in epoch order, so the oldest one is at the front of a
//! send-order queue; entries retired behind a live front are dropped once the front goes.
//! Bounds: at most the core's write slots (`max-buffers` × 2) entries, each 24 bytes.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// Writes sent to the peer and not yet retired, with the time they were queued.
#[derive(Debug, Default)]
pub(super) struct PeerWaits {
    sent: HashMap<u64, Instant>,
    order: VecDeque<u64>,
}

impl PeerWaits {
    /// The write with core tag `tag` was queued to the peer at `at`.
    pub(super) fn sent(&mut self, tag: u64, at: Instant) {
        if self.sent.insert(tag, at).is_none() {
            self.order.push_back(tag);
        }
    }

    /// The core retired write `tag` (a tag never sent is ignored).
    pub(super) fn retired(&mut self, tag: u64) {
        if self.sent.remove(&tag).is_some() {
            self.prune();
        }
    }

    /// The connection is gone: nothing waits for it any more.
    pub(super) fn clear(&mut self) {
        self.sent.clear();
        self.order.clear();
    }

    /// When the oldest write still waiting for the peer was queued.
    pub(super) fn oldest(&self) -> Option<Instant> {
        self.order.iter().find_map(|t| self.sent.get(t).copied())
    }

    fn prune(&mut self) {
        while let Some(t) = self.order.front() {
            if self.sent.contains_key(t) {
                break;
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn oldest_is_the_first_sent_not_retired() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut w = PeerWaits::default();
        assert_eq!(w.oldest(), None);
        w.sent(1, at(0));
        w.sent(2, at(10));
        w.sent(3, at(20));
        w.retired(2);
        assert_eq!(w.oldest(), Some(at(0)));
        w.retired(1);
        assert_eq!(w.oldest(), Some(at(20)));
        assert_eq!(
            w.order.len(),
            1,
            "retired entries behind the front are pruned"
        );
        w.retired(99);
        w.retired(3);
        assert_eq!(w.oldest(), None);
        assert!(w.order.is_empty());
        w.sent(4, at(30));
        w.clear();
        assert_eq!(w.oldest(), None);
    }
}
