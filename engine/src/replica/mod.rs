//! The replica's rules that both of its drivers apply: the daemon's IO driver
//! (`volume`) and the seeded simulator (`sim`). Each rule here is code that exists once,
//! so the simulator's properties and sabotage tests check the daemon's rule, not a copy.
//!
//! This module is where the sans-IO replica core of issue 11 grows (today `volume/`
//! still decides roles, connection and disk states and the order of metadata writes,
//! and `sim/` keeps its own glue for them). What has moved:
//!
//! - [`FailedLocal`]: a SyncSource's failed local writes stay out of sync whatever
//!   resync acks arrive (the simulator's seed 30).

mod failed;

pub(crate) use failed::FailedLocal;
