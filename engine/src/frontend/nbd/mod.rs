//! The NBD frontend: serves a [`BlockTarget`](crate::frontend::BlockTarget) over the
//! fixed-newstyle NBD protocol on a Unix socket or TCP, to qemu, `fio --ioengine=nbd`,
//! `qemu-img`, `nbdsh`/`nbdcopy` and the kernel's `nbd-client`.
//!
//! [`proto`] is the pure codec (greeting, option haggling, request and reply layouts);
//! [`server`] owns the sockets and the concurrency: one reader per connection runs the
//! newest request itself and moves it to a task of its own only when the next one
//! arrives first; replies go out in completion order through one writer.
//!
//! What it advertises comes from the target's [`TargetInfo`](crate::frontend::TargetInfo)
//! ([`proto::block_sizes`], [`proto::transmission_flags`]). For the volume:
//! `NBD_INFO_BLOCK_SIZE` minimum = the backing device's logical block size (512, or 4096
//! on a device or file system that needs 4096-byte O_DIRECT alignment), preferred = its
//! physical block size (4096 for files), maximum = 32 MiB; flags FLUSH and FUA (the
//! volume has a volatile cache and FUA), TRIM and WRITE_ZEROES (its limits are not 0),
//! MULTI_CONN. A request not aligned to the minimum, or a READ/WRITE over the maximum,
//! gets `EINVAL` before it reaches the target; a TRIM or WRITE_ZEROES over the target's
//! limit (the volume's 128 MiB) is split into pieces sent together and answered once
//! (qemu-img and fstrim send up to 2 GiB). Each READ gets a buffer of its length that the
//! target fills and hands back; connection `n` submits on queue `n mod 64`.
//!
//! Bounds (defaults in [`NbdOptions`]): 64 connections per listener and 32 per source
//! address (when full, a connection idle for `idle-timeout`, 60 s, gives its slot to the
//! new client), 128 requests in flight per connection (a full window stops the reader,
//! which back-pressures the client), 64 MiB of READ/WRITE data per connection and 256 MiB
//! shared by all connections, a reply write of at most 30 s, a 10 s handshake, 32 MiB
//! per READ/WRITE (or the target's smaller limit), 8 KiB per option, 64 options per
//! handshake.
//! Hostile input drops only its own connection, with a `warn` naming the peer and why.

pub mod proto;
pub mod server;

pub use server::{
    serve_connection, serve_tcp, serve_unix, DataBudget, ListenAddr, NbdListener, NbdOptions,
    MAX_BYTES_IN_FLIGHT,
};
