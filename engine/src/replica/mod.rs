//! The replica's rules that both of its drivers apply: the daemon's IO driver
//! (`volume`) and the seeded simulator (`sim`). Each rule here is code that exists once,
//! so the simulator's properties and sabotage tests check the daemon's rule, not a copy.
//!
//! This module is where the sans-IO replica core of issue 11 grows (today `volume/`
//! still holds the connection's IO and the order of bitmap-page and superblock writes,
//! and the management commands' IO). What has moved:
//!
//! - [`Node`]: one node's write pipelines — the `Primary` and `Receiver` cores, the
//!   runs, the flush rounds — whose outputs it drains into [`Action`]s (a local write
//!   only once the runs let it go, one flush per round, sends tagged with a stream
//!   class, completions), and which takes local-write, flush-round and connection-loss
//!   events; the daemon holds one, the simulator one per node;
//! - the node's state: its role, disk state and UUIDs, the connection's state (DRBD's
//!   `cstate`), the peer's role and disk as last reported and what a change of them
//!   means ([`PeerDisk`]), the decision on the peer's state change requests, and this
//!   node's `P_STATE`;
//! - role changes ([`Promotion`], in `roles.rs`): who may become Primary (the daemon's
//!   `primary`, the simulator's failover, split brains, restarts and promotion races),
//!   the generation a promotion starts, what is made durable before the role is taken,
//!   when a durable promotion is still taken (the rules again, the same connection)
//!   and what an abandoned one restores; the demotion's steps — each an event of
//!   [`Node::step`] (`role_cmd.rs`: the peer asked first while connected, its reply,
//!   its silence, one role change at a time);
//! - [`SyncRuns`]: the node's resync target and source — run ids, held writes, writes in
//!   flight when a run starts, a run cut by a connection loss, the end of a run, the
//!   stream class of each packet — taking one event at a time (through [`Node::step`])
//!   and returning [`SyncAction`]s, which the node's drain turns into its [`Action`]s;
//!   `volume/sync.rs` and `sim/resync.rs` only perform them;
//! - [`FlushRounds`]: a Secondary's epoch flushes merged into rounds, each request
//!   satisfied only by a flush issued after it;
//! - the handshake's decision (`handshake.rs`): what this node says of itself and what
//!   DRBD's sync handshake makes of the peer's answer, with the UUID corrections that
//!   only the simulator used to apply;
//! - the order in which each of those sequences makes its state durable
//!   ([`Durable`] plans, `durable.rs`: data flush, bitmap pages, superblock), which
//!   both drivers perform step by step;
//! - the management commands that change the node's state (`admin.rs`): `invalidate`,
//!   `new-current-uuid` with and without `--clear-bitmap` and the peer's side of a
//!   skipped initial sync, online verify's start on both sides and its end — each a
//!   check, a change in memory and the order of what the driver makes durable, each an
//!   event of [`Node::step`] (a plan is an [`Action::Persist`]);
//! - [`Node::step`] (`step.rs`): the one entry point for the write path's and the
//!   resync's events — the peer's writes, barriers, acks and barrier acks, protocol A's
//!   hand-off, a local write or a flush round that ended, the connection's start and
//!   loss, resync and verify packets, the resync clock, a run's read or write that
//!   ended — with who may send what, the Receiver's
//!   back-pressure, the marks for a Diskless peer's writes and the SyncTarget Primary's
//!   `P_NEG_ACK` rule; its errors say whether the peer or the driver broke a rule;
//! - a failed local write (`disk.rs`, [`Node::local_write_failed`]): DRBD's
//!   `on-io-error`, what leaves service and what the driver records;
//! - [`FailedLocal`]: a SyncSource's failed local writes stay out of sync whatever
//!   resync acks arrive (the simulator's seed 30).

mod admin;
mod disk;
mod durable;
mod failed;
mod flush;
mod handshake;
mod node;
mod role_cmd;
mod roles;
mod step;
mod sync;

pub(crate) use admin::{Admin, Then};
pub(crate) use disk::DiskFailure;
pub(crate) use durable::Durable;
pub(crate) use failed::FailedLocal;
pub(crate) use flush::FlushRounds;
pub(crate) use handshake::{RunStart, SyncRole, Up};
pub(crate) use node::{
    Action, LocalWrite, Node, PeerDisk, PeerStartedRuns, Side, SourceEnd, TargetEnd,
};
pub(crate) use role_cmd::Why;
#[cfg(any(test, feature = "sim"))]
pub(crate) use roles::Refusal;
#[cfg(any(test, feature = "sim"))]
pub(crate) use roles::{promoted_uuids, GenerationFacts};
pub(crate) use roles::{Promotion, StartupRefusal};
pub(crate) use step::{Event, Io, Outcome, StepError};
pub(crate) use sync::{ReadFor, RunRead, SyncAction, SyncRuns};
