//! tandem-engine: a userspace block replication engine with a DRBD-compatible data path.
//!
//! One module per concept (docs/design.md §1), each opaque outside its small surface:
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
//! | [`config`] | the TOML resource file |
//! | [`sockfile`] | Unix socket files: a live listener's path is never replaced |
//! | [`volume`] | the driver: runs the sans-IO core against real disks and sockets |
//! | [`sim`] | the seeded simulator of two replicas with faulty disks and networks |

pub mod config;
pub mod daemon;
pub mod frontend;
pub mod fuzz;
pub mod meta;
pub mod mgmt;
pub mod net;
pub mod ratelog;
pub mod request;
pub mod resync;
pub mod sim;
pub mod sockfile;
pub mod state;
pub mod store;
pub mod volume;
pub mod wire;
