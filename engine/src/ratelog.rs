//! Rate-limited warnings for whatever a remote party can trigger over and over (a refused
//! replication socket, a malformed NBD request, a bad management line, a refused peer).
//!
//! [`warn_limited!`](crate::warn_limited) logs like `tracing::warn!`, but each call site
//! logs at most [`BURST`] lines per [`WINDOW`] (10 s); the rest are counted, and the first
//! line logged after the window says how many were left out:
//! `… (and 1234 more like it in the last 10 s)`. A flood of refusals therefore costs at
//! most [`BURST`] lines per 10 s per call site, however fast it comes, and no count is
//! lost. The limiter is one mutex-guarded counter per call site (a `static`), taken only
//! when the warning fires.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Length of one rate window.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);
/// Lines one call site logs per window.
pub(crate) const BURST: u32 = 5;

/// One call site's limiter.
#[derive(Debug)]
pub(crate) struct RateLimit {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Start of the current window (None before the first event).
    window: Option<Instant>,
    /// Lines logged in the current window.
    logged: u32,
    /// Events left out since the last logged line.
    suppressed: u64,
    /// When the first left-out event happened.
    suppressed_since: Option<Instant>,
}

/// What the caller does with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Log it; `suppressed` events were left out before it, over `secs` seconds.
    Log {
        /// Events left out since the last logged line.
        suppressed: u64,
        /// Seconds since the first of them (rounded up).
        secs: u64,
    },
    /// Count it, log nothing.
    Skip,
}

impl RateLimit {
    /// A limiter with nothing logged yet.
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                window: None,
                logged: 0,
                suppressed: 0,
                suppressed_since: None,
            }),
        }
    }

    /// Decides about one event happening now.
    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// [`RateLimit::check`] at a given time (for tests).
    pub fn check_at(&self, now: Instant) -> Verdict {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.window
            .is_none_or(|w| now.saturating_duration_since(w) >= WINDOW)
        {
            s.window = Some(now);
            s.logged = 0;
        }
        if s.logged >= BURST {
            if s.suppressed == 0 {
                s.suppressed_since = Some(now);
            }
            s.suppressed += 1;
            return Verdict::Skip;
        }
        s.logged += 1;
        let suppressed = std::mem::take(&mut s.suppressed);
        let secs = s.suppressed_since.take().map_or(0, |t| {
            let d = now.saturating_duration_since(t);
            d.as_secs() + u64::from(d.subsec_nanos() > 0)
        });
        Verdict::Log { suppressed, secs }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` with a per-call-site limit (see `crate::ratelog`): format arguments
/// only, no structured fields.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelog::RateLimit = $crate::ratelog::RateLimit::new();
        if let $crate::ratelog::Verdict::Log { suppressed, secs } = LIMIT.check() {
            if suppressed > 0 {
                ::tracing::warn!(
                    "{} (and {} more like it in the last {} s)",
                    format_args!($($arg)+),
                    suppressed,
                    secs
                );
            } else {
                ::tracing::warn!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_counts_then_reports() {
        let l = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(
                l.check_at(t0),
                Verdict::Log {
                    suppressed: 0,
                    secs: 0
                }
            );
        }
        for i in 0..1234 {
            assert_eq!(l.check_at(t0 + Duration::from_millis(i)), Verdict::Skip);
        }
        // Still inside the window: skipped.
        assert_eq!(l.check_at(t0 + Duration::from_secs(9)), Verdict::Skip);
        match l.check_at(t0 + WINDOW) {
            Verdict::Log { suppressed, secs } => {
                assert_eq!(suppressed, 1235);
                assert_eq!(secs, 10);
            }
            Verdict::Skip => panic!("a new window logs"),
        }
        assert_eq!(
            l.check_at(t0 + WINDOW),
            Verdict::Log {
                suppressed: 0,
                secs: 0
            }
        );
    }
}
