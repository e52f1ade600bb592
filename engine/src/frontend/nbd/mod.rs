//! The NBD frontend: serves a [`BlockTarget`](crate::frontend::BlockTarget) over the
//! fixed-newstyle NBD protocol on a Unix socket or TCP, to qemu, `fio --ioengine=nbd`,
//! `qemu-img`, `nbdsh`/`nbdcopy` and the kernel's `nbd-client`.
//!
//! [`proto`] is the pure codec (greeting, option haggling, request and reply layouts);
//! [`server`] owns the sockets and the concurrency: one reader per connection starts every
//! request as its own task, replies go out in completion order through one writer.
//!
//! Bounds (defaults in [`NbdOptions`]): 64 connections per listener and 32 per source
//! address (when full, a connection idle for `idle-timeout`, 60 s, gives its slot to the
//! new client), 128 requests in flight per connection (a full window stops the reader,
//! which back-pressures the client), 64 MiB of READ/WRITE data per connection and 256 MiB
//! shared by all connections, a reply write of at most 30 s, a 10 s handshake, 32 MiB
//! per READ/WRITE, 8 KiB per option, 64 options per handshake.
//! Hostile input drops only its own connection, with a `warn` naming the peer and why.

pub mod proto;
pub mod server;

pub use server::{
    serve_connection, serve_tcp, serve_unix, DataBudget, ListenAddr, NbdListener, NbdOptions,
    MAX_BYTES_IN_FLIGHT,
};
