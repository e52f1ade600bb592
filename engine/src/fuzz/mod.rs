//! Fuzz target bodies.
//!
//! Each decoder's fuzz body lives here so that `fuzz/` (cargo-fuzz, nightly) and the
//! stable test suite run exactly the same code: tests feed every body a corpus plus
//! bounded random inputs. A body must never panic on any input.

pub mod al;
pub mod bitmap;
pub mod config;
pub mod mgmt;
pub mod nbd;
pub mod packet;
pub mod superblock;
