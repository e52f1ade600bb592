//! The replica's rules that both of its drivers apply: the daemon's IO driver
//! (`volume`) and the seeded simulator (`sim`). Each rule here is code that exists once,
//! so the simulator's properties and sabotage tests check the daemon's rule, not a copy.
//!
//! This module is where the sans-IO replica core of issue 11 grows (today `volume/`
//! still decides roles, connection and disk states and the order of metadata writes,
//! and `sim/` keeps its own glue for them). What has moved:
//!
//! - [`FailedLocal`]: a SyncSource's failed local writes stay out of sync whatever
//!   resync acks arrive (the simulator's seed 30);
//! - [`may_promote`]: who may become Primary (the daemon's `primary`, the simulator's
//!   failover and promotion races).

mod failed;
mod roles;

pub(crate) use failed::FailedLocal;
#[cfg(any(test, feature = "sim"))]
pub(crate) use roles::Refusal;
pub(crate) use roles::{may_promote, PromotionFacts};
