//! TCP socket set-up for the replication connection.
//!
//! Every socket gets `TCP_NODELAY` (a 4 KiB write and its ack must not wait for Nagle),
//! `SO_KEEPALIVE` (23 s idle/interval, 9 probes: DRBD 9's tcp transport), a
//! `TCP_USER_TIMEOUT` of `ko-count × timeout` (42 s by default; none with `ko-count` 0) and
//! the configured buffer sizes. The user timeout is only a backstop: the connection's
//! watchdog (`net::liveness`) declares a silent peer dead after `timeout + ping-timeout`
//! already; a user timeout of `timeout` alone would drop a live peer whose receive window
//! stays closed for `timeout`, which DRBD tolerates up to `ko-count × timeout`.

use crate::config::NetConfig;
use socket2::{SockRef, TcpKeepalive};
use std::time::Duration;
use tokio::net::TcpStream;

/// Which of the two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Writes, barriers, state: the data socket.
    Data,
    /// Acks and pings: the meta socket.
    Meta,
}

/// Applies tandem's socket options; failures to set optional ones are logged, not fatal.
pub fn tune(stream: &TcpStream, role: Role, net: &NetConfig) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(23))
        .with_interval(Duration::from_secs(23))
        .with_retries(9);
    let _ = sock.set_tcp_keepalive(&keepalive);
    if net.ko_count > 0 {
        let user_timeout = net
            .timeout
            .saturating_mul(net.ko_count)
            .max(Duration::from_secs(1));
        if let Err(e) = sock.set_tcp_user_timeout(Some(user_timeout)) {
            tracing::debug!("TCP_USER_TIMEOUT not set: {e}");
        }
    }
    if net.sndbuf_size > 0 {
        sock.set_send_buffer_size(net.sndbuf_size as usize)?;
    }
    if net.rcvbuf_size > 0 {
        sock.set_recv_buffer_size(net.rcvbuf_size as usize)?;
    }
    // SO_PRIORITY (DRBD: 4 data, 6 meta) and DSCP marking need setsockopt calls socket2
    // 0.5 does not wrap; they come with the QoS work (docs/design.md §5).
    let _ = role;
    Ok(())
}
