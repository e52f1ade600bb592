//! Who has a volume open for writing: DRBD's open count, for the "held open" refusal.
//!
//! A frontend registers each client that can write ([`Openers::register`]) — for NBD, a
//! connection that finished its handshake on an export advertised writable; a read-only
//! export does not count — and the registration ends when the returned [`OpenGuard`] is
//! dropped (the connection is over and its requests are answered). The volume asks
//! [`Openers::held_open`] before it demotes: `secondary` is refused while the count is
//! non-zero, unless forced. The registry is bounded by the frontends' own connection
//! limits (64 per NBD listener); a refusal names at most [`MAX_NAMED`] openers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Openers named in a refusal; the rest are counted.
pub const MAX_NAMED: usize = 8;

/// The registry of openers of one volume (shared by all its frontends).
#[derive(Debug, Default)]
pub struct Openers {
    inner: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    next: u64,
    open: BTreeMap<u64, (String, Instant)>,
}

/// One registered opener; dropping it ends the registration.
#[derive(Debug)]
pub struct OpenGuard {
    openers: Arc<Openers>,
    id: u64,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.openers.lock().open.remove(&self.id);
    }
}

impl Openers {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // The registry is a map of strings: a panic elsewhere cannot leave it half-made.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a writer described by `who` (e.g. `NBD client unix:/run/r0.nbd#3`).
    pub fn register(self: &Arc<Self>, who: String) -> OpenGuard {
        let mut g = self.lock();
        g.next += 1;
        let id = g.next;
        g.open.insert(id, (who, Instant::now()));
        OpenGuard {
            openers: Arc::clone(self),
            id,
        }
    }

    /// How many writers have the volume open.
    pub fn count(&self) -> usize {
        self.lock().open.len()
    }

    /// The writers, oldest first, as `who (open N s)`.
    pub fn describe(&self) -> Vec<String> {
        self.lock()
            .open
            .values()
            .map(|(who, since)| format!("{who} (open {} s)", since.elapsed().as_secs()))
            .collect()
    }

    /// `None` when nothing has the volume open for writing; otherwise the refusal's
    /// text: `held open by 2 writers: NBD client … (open 12 s), NBD client …`.
    pub fn held_open(&self) -> Option<String> {
        let all = self.describe();
        if all.is_empty() {
            return None;
        }
        let n = all.len();
        let mut text = format!(
            "held open by {n} writer{}: {}",
            if n == 1 { "" } else { "s" },
            all.iter()
                .take(MAX_NAMED)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        if n > MAX_NAMED {
            text.push_str(&format!(" and {} more", n - MAX_NAMED));
        }
        Some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_end_with_their_guard() {
        let o = Arc::new(Openers::default());
        assert_eq!(o.held_open(), None);
        let a = o.register("NBD client unix:/x#1".into());
        let b = o.register("NBD client 127.0.0.1:5000".into());
        assert_eq!(o.count(), 2);
        let text = o.held_open().expect("held");
        assert!(text.starts_with("held open by 2 writers: NBD client unix:/x#1 (open "));
        assert!(text.contains("127.0.0.1:5000"));
        drop(a);
        assert_eq!(o.count(), 1);
        drop(b);
        assert_eq!(o.held_open(), None);
        let many: Vec<_> = (0..10).map(|i| o.register(format!("c{i}"))).collect();
        assert!(o.held_open().expect("held").ends_with(" and 2 more"));
        drop(many);
        assert_eq!(o.count(), 0);
    }
}
