//! The replica's rules that both of its drivers apply: the daemon's IO driver
//! (`volume`) and the seeded simulator (`sim`). Each rule here is code that exists once,
//! so the simulator's properties and sabotage tests check the daemon's rule, not a copy.
//!
//! This module is where the sans-IO replica core of issue 11 grows (today `volume/`
//! still decides roles, connection and disk states and the order of metadata writes,
//! and `sim/` keeps its own glue for them). What has moved:
//!
//! - [`Node`]: one node's write pipelines — the `Primary` and `Receiver` cores, the
//!   runs, the flush rounds — whose outputs it drains into [`Action`]s (a local write
//!   only once the runs let it go, one flush per round, sends tagged with a stream
//!   class, completions), and which takes local-write, flush-round and connection-loss
//!   events; the daemon holds one, the simulator one per node;
//! - [`SyncRuns`]: the node's resync target and source — run ids, held writes, writes in
//!   flight when a run starts, a run cut by a connection loss, the end of a run, the
//!   stream class of each packet — taking one event at a time and returning
//!   [`SyncAction`]s; `volume/sync.rs` and `sim/resync.rs` only perform them;
//! - [`FlushRounds`]: a Secondary's epoch flushes merged into rounds, each request
//!   satisfied only by a flush issued after it;
//! - [`FailedLocal`]: a SyncSource's failed local writes stay out of sync whatever
//!   resync acks arrive (the simulator's seed 30);
//! - [`may_promote`]: who may become Primary (the daemon's `primary`, the simulator's
//!   failover and promotion races), and [`promoted_uuids`]: the generation a promotion
//!   starts (the daemon's promotions, the simulator's Primary restarts and split-brain
//!   promotions).

mod failed;
mod flush;
mod node;
mod roles;
mod sync;

pub(crate) use failed::FailedLocal;
pub(crate) use flush::FlushRounds;
pub(crate) use node::{Action, LocalWrite, Node, Side, TargetEnd};
#[cfg(any(test, feature = "sim"))]
pub(crate) use roles::Refusal;
pub(crate) use roles::{may_promote, promoted_uuids, GenerationFacts, PromotionFacts};
pub(crate) use sync::{ReadFor, RunRead, SyncAction, SyncRuns};
