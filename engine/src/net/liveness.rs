//! When is the peer dead: DRBD 8.4's `ping-int`, `ping-timeout`, `timeout` and `ko-count`
//! as one pure decision ([`Liveness::step`]); the connection's watchdog task feeds it the
//! clock and what the sockets saw (docs/protocol.md, *Liveness*, has DRBD's rules and
//! their sources).
//!
//! - A `P_PING` goes out when the meta socket has been silent for `ping-int` (DRBD's
//!   ack receiver with `rcvtimeo = ping-int`), when the oldest write (or barrier) still
//!   awaiting the peer has waited `timeout` — and again every `timeout` while it waits —
//!   or when a sender has been blocked on a full socket for `timeout` (DRBD's
//!   `we_should_drop_the_connection`, which calls `request_ping`).
//! - While a ping is unanswered, `ping-timeout` of meta silence declares the peer dead
//!   (DRBD: "PingAck did not arrive in time"). So a peer that stops answering is dropped at
//!   most `timeout + ping-timeout` (+ one [`TICK`]) after the write it left waiting was
//!   sent, and the Primary completes its writes alone.
//! - `ko-count`: a peer that answers pings but leaves one write unanswered for
//!   `ko-count × timeout` is dropped (DRBD's `request_timer_fn`); 0 disables it.
//!
//! Bounds: the watchdog sleeps until the earliest moment the decision can change
//! ([`Liveness::step`]'s wait): `ping-int` after the last meta packet, the oldest waiting
//! write's `timeout` (or the next `timeout` after the ping it caused) and its ko limit.
//! What can bring a deadline closer wakes it instead: a write that starts waiting while
//! none did (`net::Link`'s watch) and a blocked sender. While a ping is outstanding it
//! looks every [`TICK`] (100 ms). So every deadline above is met within 100 ms, an idle
//! connection wakes once per `ping-int`, and one ping is outstanding at a time.

use std::time::{Duration, Instant};

/// Longest sleep of the watchdog while a ping is outstanding.
pub const TICK: Duration = Duration::from_millis(100);

/// Shortest sleep between two looks (a deadline that is due now is looked at again soon,
/// never in a busy loop).
const MIN_LOOK: Duration = Duration::from_millis(1);

/// The four options, as durations (see `config::NetConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// `ping-int`: meta-socket silence before a ping.
    pub ping_int: Duration,
    /// `ping-timeout`: time a ping has to be answered.
    pub ping_timeout: Duration,
    /// `timeout`: a write waiting this long for the peer (or a send blocked this long)
    /// makes the node ping at once.
    pub timeout: Duration,
    /// `ko-count`: a write waiting `ko_count × timeout` drops the peer; 0 = never.
    pub ko_count: u32,
}

impl LivenessConfig {
    /// `ko-count × timeout`, or `None` when ko-count is 0.
    pub fn ko_limit(&self) -> Option<Duration> {
        (self.ko_count > 0).then(|| self.timeout.saturating_mul(self.ko_count))
    }
}

/// What the connection saw, at `now`.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    /// The clock.
    pub now: Instant,
    /// The last packet received on the meta socket (the connection's start before one).
    pub last_rx: Instant,
    /// `P_PING_ACK`s received so far on this connection.
    pub ping_acks: u64,
    /// When the oldest write still awaiting the peer (its ack or its epoch's barrier ack)
    /// was queued to the peer; `None` when nothing waits.
    pub oldest_wait: Option<Instant>,
    /// A sender has been blocked on a full socket for `timeout` since the last look.
    pub ping_requested: bool,
}

/// Why the peer was declared dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dead {
    /// A ping went unanswered (no meta packet) for `ping-timeout`.
    NoPingAck {
        /// Why the ping was sent.
        reason: PingReason,
    },
    /// A write waited `ko-count × timeout` for the peer.
    KoCount {
        /// How long it has waited.
        waited: Duration,
    },
}

/// Why a ping was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingReason {
    /// The meta socket was silent for `ping-int`.
    Idle,
    /// A write has waited `timeout` for the peer.
    WriteWaiting,
    /// A send was blocked for `timeout`.
    SendBlocked,
}

impl PingReason {
    /// For log lines.
    pub fn describe(self) -> &'static str {
        match self {
            PingReason::Idle => "the meta socket was silent for ping-int",
            PingReason::WriteWaiting => "a write waited `timeout` for the peer",
            PingReason::SendBlocked => "a send was blocked for `timeout`",
        }
    }
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send a `P_PING`, then look again within the duration.
    Ping(PingReason, Duration),
    /// Look again within the duration (or when a sender asks for a ping).
    Wait(Duration),
    /// Drop the connection.
    Dead(Dead),
}

/// The watchdog's state: the outstanding ping and when the last one went out.
#[derive(Debug, Clone)]
pub struct Liveness {
    cfg: LivenessConfig,
    /// (sent at, `ping_acks` then, why).
    outstanding: Option<(Instant, u64, PingReason)>,
    last_ping: Option<Instant>,
}

impl Liveness {
    /// No ping sent yet.
    pub fn new(cfg: LivenessConfig) -> Self {
        Liveness {
            cfg,
            outstanding: None,
            last_ping: None,
        }
    }

    /// Decides, from what the connection saw, whether to ping, wait or give up.
    pub fn step(&mut self, o: &Observation) -> Step {
        let now = o.now;
        let waited = o.oldest_wait.map(|t| now.saturating_duration_since(t));
        if let (Some(limit), Some(w)) = (self.cfg.ko_limit(), waited) {
            if w >= limit {
                return Step::Dead(Dead::KoCount { waited: w });
            }
        }
        if let Some((at, acks, reason)) = self.outstanding {
            if o.ping_acks != acks {
                self.outstanding = None;
            } else {
                // DRBD's ack receiver waits `ping-timeout` per receive while a ping is out:
                // any meta packet restarts the wait, only silence kills.
                let since = at.max(o.last_rx);
                let silent = now.saturating_duration_since(since);
                if silent >= self.cfg.ping_timeout {
                    return Step::Dead(Dead::NoPingAck { reason });
                }
                return Step::Wait(TICK.min(self.cfg.ping_timeout - silent));
            }
        }
        let idle = now.saturating_duration_since(o.last_rx) >= self.cfg.ping_int;
        let since_ping = self
            .last_ping
            .map_or(Duration::MAX, |p| now.saturating_duration_since(p));
        let write_waiting =
            waited.is_some_and(|w| w >= self.cfg.timeout) && since_ping >= self.cfg.timeout;
        let reason = if o.ping_requested {
            Some(PingReason::SendBlocked)
        } else if write_waiting {
            Some(PingReason::WriteWaiting)
        } else if idle {
            Some(PingReason::Idle)
        } else {
            None
        };
        match reason {
            Some(r) => {
                self.outstanding = Some((now, o.ping_acks, r));
                self.last_ping = Some(now);
                Step::Ping(r, TICK.min(self.cfg.ping_timeout))
            }
            None => Step::Wait(self.next_look(o)),
        }
    }

    /// How long nothing can change unless something wakes the watchdog: until `ping-int`
    /// of meta silence, and, while a write waits, until it has waited `timeout` since it
    /// was queued and since the last ping, and until its ko limit. Later packets and
    /// completions only move these later; a write that starts waiting wakes the watchdog.
    fn next_look(&self, o: &Observation) -> Duration {
        let until =
            |t: Option<Instant>| t.map_or(Duration::MAX, |t| t.saturating_duration_since(o.now));
        let mut wait = until(o.last_rx.checked_add(self.cfg.ping_int));
        if let Some(w) = o.oldest_wait {
            let ping_at = w.checked_add(self.cfg.timeout).map(|at| {
                self.last_ping
                    .and_then(|p| p.checked_add(self.cfg.timeout))
                    .map_or(at, |again| at.max(again))
            });
            wait = wait.min(until(ping_at));
            if let Some(limit) = self.cfg.ko_limit() {
                wait = wait.min(until(w.checked_add(limit)));
            }
        }
        wait.clamp(MIN_LOOK, self.cfg.ping_int.max(MIN_LOOK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: LivenessConfig = LivenessConfig {
        ping_int: Duration::from_secs(10),
        ping_timeout: Duration::from_millis(500),
        timeout: Duration::from_secs(2),
        ko_count: 7,
    };

    /// Drives a [`Liveness`] on a virtual clock: `t0` is the connection's start.
    struct Sim {
        l: Liveness,
        t0: Instant,
        last_rx: Instant,
        acks: u64,
        oldest: Option<Instant>,
    }

    impl Sim {
        fn new(cfg: LivenessConfig) -> Self {
            let t0 = Instant::now();
            Sim {
                l: Liveness::new(cfg),
                t0,
                last_rx: t0,
                acks: 0,
                oldest: None,
            }
        }
        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
        fn step(&mut self, ms: u64, requested: bool) -> Step {
            let o = Observation {
                now: self.at(ms),
                last_rx: self.last_rx,
                ping_acks: self.acks,
                oldest_wait: self.oldest,
                ping_requested: requested,
            };
            self.l.step(&o)
        }
        /// Steps every `TICK` from `from` to `to` (ms); returns the first non-wait step
        /// and its time.
        fn run(&mut self, from: u64, to: u64) -> Option<(u64, Step)> {
            let mut t = from;
            while t <= to {
                match self.step(t, false) {
                    Step::Wait(_) => {}
                    s => return Some((t, s)),
                }
                t += 100;
            }
            None
        }
    }

    #[test]
    fn idle_meta_socket_pings_after_ping_int() {
        let mut s = Sim::new(CFG);
        assert_eq!(
            s.run(0, 20_000),
            Some((
                10_000,
                Step::Ping(PingReason::Idle, Duration::from_millis(100))
            ))
        );
        // The ack comes 10 ms later: no death, the next idle ping 10 s after it.
        s.last_rx = s.at(10_010);
        s.acks = 1;
        assert_eq!(s.run(10_100, 30_000).map(|x| x.0), Some(20_100));
    }

    #[test]
    fn a_stopped_peer_is_dead_at_timeout_plus_ping_timeout() {
        let mut s = Sim::new(CFG);
        // Acks flow until 5 s; the write sent at 5 s is never answered.
        s.last_rx = s.at(5_000);
        s.oldest = Some(s.at(5_000));
        assert_eq!(
            s.run(5_000, 30_000),
            Some((
                7_000,
                Step::Ping(PingReason::WriteWaiting, Duration::from_millis(100))
            ))
        );
        let dead = s.run(7_100, 30_000).expect("declared dead");
        assert_eq!(
            dead,
            (
                7_500,
                Step::Dead(Dead::NoPingAck {
                    reason: PingReason::WriteWaiting
                })
            )
        );
        // That is timeout + ping-timeout after the write, long before ping-int.
        assert!(dead.0 - 5_000 <= 2_500);
    }

    #[test]
    fn meta_traffic_during_an_outstanding_ping_extends_it() {
        let mut s = Sim::new(CFG);
        s.oldest = Some(s.at(0));
        assert!(matches!(s.step(2_000, false), Step::Ping(..)));
        s.last_rx = s.at(2_400); // an ack of another write
        assert!(matches!(s.step(2_600, false), Step::Wait(_)));
        assert!(matches!(s.step(2_900, false), Step::Dead(_)));
    }

    #[test]
    fn a_live_but_slow_peer_is_pinged_every_timeout_then_dropped_by_ko_count() {
        let mut s = Sim::new(CFG);
        s.oldest = Some(s.at(0));
        let mut pings = Vec::new();
        let mut t = 0;
        let end = loop {
            match s.step(t, false) {
                Step::Ping(r, _) => {
                    assert_eq!(r, PingReason::WriteWaiting);
                    pings.push(t);
                    // The peer answers every ping at once.
                    s.last_rx = s.at(t + 1);
                    s.acks += 1;
                }
                Step::Dead(d) => break (t, d),
                Step::Wait(_) => {}
            }
            t += 100;
            assert!(t < 60_000, "never dropped");
        };
        assert_eq!(pings, vec![2_000, 4_000, 6_000, 8_000, 10_000, 12_000]);
        assert_eq!(
            end,
            (
                14_000,
                Dead::KoCount {
                    waited: Duration::from_secs(14)
                }
            )
        );
    }

    #[test]
    fn ko_count_zero_never_drops_a_peer_that_answers_pings() {
        let mut s = Sim::new(LivenessConfig { ko_count: 0, ..CFG });
        s.oldest = Some(s.at(0));
        for t in (0..120_000).step_by(100) {
            match s.step(t, false) {
                Step::Ping(..) => {
                    s.last_rx = s.at(t + 1);
                    s.acks += 1;
                }
                Step::Dead(d) => panic!("dropped at {t} ms: {d:?}"),
                Step::Wait(_) => {}
            }
        }
    }

    #[test]
    fn the_watchdog_sleeps_until_the_next_deadline() {
        let mut s = Sim::new(CFG);
        // Idle: until ping-int after the last meta packet.
        assert_eq!(
            s.step(2_500, false),
            Step::Wait(Duration::from_millis(7_500))
        );
        // A write waiting since 3 s: its `timeout` (2 s) comes first.
        s.oldest = Some(s.at(3_000));
        assert_eq!(
            s.step(4_000, false),
            Step::Wait(Duration::from_millis(1_000))
        );
        assert!(matches!(
            s.step(5_000, false),
            Step::Ping(PingReason::WriteWaiting, _)
        ));
        s.last_rx = s.at(5_010); // the ping ack
        s.acks += 1;
        // Still waiting: the next ping one `timeout` after this one.
        assert_eq!(
            s.step(5_100, false),
            Step::Wait(Duration::from_millis(1_900))
        );
        assert_eq!(
            s.step(7_000, false),
            Step::Ping(PingReason::WriteWaiting, TICK)
        );
        // Nothing waits any more: back to ping-int after the last meta packet.
        s.oldest = None;
        s.last_rx = s.at(7_005);
        s.acks += 1;
        assert_eq!(
            s.step(7_105, false),
            Step::Wait(Duration::from_millis(9_900))
        );
    }

    #[test]
    fn a_blocked_sender_gets_a_ping_at_once() {
        let mut s = Sim::new(CFG);
        assert!(matches!(s.step(100, false), Step::Wait(_)));
        assert_eq!(
            s.step(200, true),
            Step::Ping(PingReason::SendBlocked, Duration::from_millis(100))
        );
        assert_eq!(
            s.run(300, 1_000).map(|x| x.0),
            Some(700),
            "dead ping-timeout after the ping"
        );
    }

    #[test]
    fn ping_timeout_shorter_than_a_tick_is_met() {
        let mut s = Sim::new(LivenessConfig {
            ping_timeout: Duration::from_millis(100),
            ..CFG
        });
        s.oldest = Some(s.at(0));
        assert_eq!(
            s.step(2_000, false),
            Step::Ping(PingReason::WriteWaiting, Duration::from_millis(100))
        );
        assert!(matches!(s.step(2_050, false), Step::Wait(d) if d == Duration::from_millis(50)));
        assert!(matches!(s.step(2_100, false), Step::Dead(_)));
    }
}
