//! tandem-engine: a userspace block replication engine with a DRBD-compatible data path.
//!
//! One module per concept (docs/design.md §1), each opaque outside its small surface.
//! Only what the binary, the integration tests and the fuzz bodies use is public; the
//! driver (`volume`), the config parser and the socket-file helpers are crate-private,
//! and the simulator (`sim`) is test code, compiled only for tests (feature `sim`).
//! The import graph has no cycle (`tidy` checks it): `volume` uses `net` through
//! `net::Replica` and `net::Link`, and `net` never names the volume.
//!
//! | module | owns |
//! |---|---|
//! | [`wire`] | the DRBD packet codec (pure, no IO) |
//! | [`store`] | backing IO: aligned buffers, one io_uring thread per backing device |
//! | [`net`] | the replication connection: sockets, handshake, streams, pings, reconnect |
//! | [`request`] | the sans-IO write/flush pipeline: epochs, barriers, acks, protocols A/B/C |
//! | [`state`] | roles, disk and connection states (DRBD's names and numbers) |
//! | [`frontend`] | how applications reach a volume: NBD (ublk later) |
//! | [`mgmt`] | the management socket (newline-delimited JSON) |
//! | `config` | the TOML resource file |
//! | `sockfile` | Unix socket files: a live listener's path is never replaced |
//! | `volume` | the driver: runs the sans-IO core against real disks and sockets |
//! | `units` | size syntax (`64MiB`) shared by the config and the metadata tool |
//! | `sim` | the seeded simulator of two replicas with faulty disks and networks (tests only) |

// The docs are written for this crate's developers (`cargo doc --document-private-items`)
// and link to crate-private items on purpose.
#![allow(rustdoc::private_intra_doc_links)]

mod config;
pub mod daemon;
pub mod frontend;
pub mod fuzz;
pub mod meta;
pub mod mgmt;
pub mod net;
mod ratelog;
mod replica;
pub mod request;
pub mod resync;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod sockfile;
pub mod state;
pub mod store;
mod units;
mod volume;
pub mod wire;
