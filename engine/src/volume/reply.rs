//! Where a frontend request's result waits for its caller: a preallocated slot per
//! request instead of a `oneshot` (an allocation) per request.
//!
//! A request takes a slot before it enters the core (`core_request`), the core's
//! `Complete` output fills it and wakes the waiting future, which frees it. A future
//! dropped before its result came (a cancelled request) marks its slot abandoned; the
//! completion frees it then. Bound: `2 × max-buffers` slots, allocated once (requests in
//! flight hold one of `max-buffers` permits; abandoned slots wait for a core completion,
//! and the core holds at most `2 × max-buffers` writes). With none free, the request uses
//! a `oneshot` as before. One `std::sync::Mutex`, a leaf (nothing is called under it but
//! `Waker::wake_by_ref`, which only schedules a task).

use crate::frontend::BlockError;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// The state of one slot.
enum State {
    Free,
    Waiting(Option<Waker>),
    Done(Result<(), BlockError>),
    /// The caller went away; the completion frees the slot.
    Abandoned,
}

struct Table {
    slots: Vec<State>,
    free: Vec<u32>,
}

/// The reply slots of one volume.
pub(super) struct Replies {
    table: Mutex<Table>,
}

impl Replies {
    /// `n` slots.
    pub(super) fn new(n: usize) -> Self {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        Replies {
            table: Mutex::new(Table {
                slots: (0..n).map(|_| State::Free).collect(),
                free: (0..n).rev().collect(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every update is one assignment; a panic cannot tear the table.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A free slot, or `None` when all are taken.
    pub(super) fn take(&self) -> Option<u32> {
        let mut t = self.lock();
        let id = t.free.pop()?;
        match t.slots.get_mut(id as usize) {
            Some(s) => *s = State::Waiting(None),
            None => return None,
        }
        Some(id)
    }

    /// Gives a slot taken by `take` back unused.
    pub(super) fn release(&self, id: u32) {
        let mut t = self.lock();
        Self::free(&mut t, id);
    }

    fn free(t: &mut Table, id: u32) {
        if let Some(s) = t.slots.get_mut(id as usize) {
            if !matches!(s, State::Free) {
                *s = State::Free;
                t.free.push(id);
            }
        }
    }

    /// The result of the request in slot `id`; wakes its caller.
    pub(super) fn complete(&self, id: u32, result: Result<(), BlockError>) {
        let mut t = self.lock();
        let Some(s) = t.slots.get_mut(id as usize) else {
            panic!("BUG: completion for reply slot {id}, which does not exist");
        };
        match std::mem::replace(s, State::Done(result)) {
            State::Waiting(waker) => {
                drop(t);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            State::Abandoned => Self::free(&mut t, id),
            State::Free | State::Done(_) => {
                panic!("BUG: reply slot {id} completed while not waiting (twice?)")
            }
        }
    }

    /// Waits for the result in slot `id` (taken by `take`).
    pub(super) fn wait(&self, id: u32) -> Wait<'_> {
        Wait {
            replies: self,
            id,
            finished: false,
        }
    }
}

/// The future of [`Replies::wait`].
pub(super) struct Wait<'a> {
    replies: &'a Replies,
    id: u32,
    finished: bool,
}

impl Future for Wait<'_> {
    type Output = Result<(), BlockError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id;
        let mut t = self.replies.lock();
        let Some(s) = t.slots.get_mut(id as usize) else {
            return Poll::Ready(Err(BlockError::Io));
        };
        match s {
            State::Done(_) => {
                let State::Done(r) = std::mem::replace(s, State::Free) else {
                    return Poll::Ready(Err(BlockError::Io));
                };
                t.free.push(id);
                drop(t);
                self.finished = true;
                Poll::Ready(r)
            }
            State::Waiting(w) => {
                match w {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            State::Free | State::Abandoned => Poll::Ready(Err(BlockError::Io)),
        }
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut t = self.replies.lock();
        let id = self.id;
        if let Some(s) = t.slots.get_mut(id as usize) {
            match s {
                State::Waiting(_) => *s = State::Abandoned,
                State::Done(_) => Replies::free(&mut t, id),
                State::Free | State::Abandoned => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_complete_wake_and_are_reused() {
        let r = Replies::new(2);
        let a = r.take().expect("a");
        let b = r.take().expect("b");
        assert!(r.take().is_none(), "two slots only");
        r.complete(b, Err(BlockError::Io));
        assert_eq!(r.wait(b).await, Err(BlockError::Io));
        let (wait, ()) = tokio::join!(r.wait(a), async {
            tokio::task::yield_now().await;
            r.complete(a, Ok(()));
        });
        assert_eq!(wait, Ok(()));
        // Both are free again.
        let c = r.take().expect("c");
        let d = r.take().expect("d");
        // A caller that went away: its completion frees the slot.
        drop(r.wait(c));
        r.complete(c, Ok(()));
        r.release(d);
        assert!(r.take().is_some() && r.take().is_some());
    }
}
