//! Unix socket files: a path where a live server listens is never replaced.
//!
//! Before binding a management or NBD socket, [`clear_stale`] looks at the path: nothing
//! there is fine; a socket file is connected to once — if something answers, the bind is
//! refused naming the listener's pid (its `SO_PEERCRED`); only a dead socket
//! (`ECONNREFUSED`: its server is gone, e.g. after `kill -9`) is removed. Anything that is
//! not a socket, or a socket whose state cannot be told (connect fails otherwise, e.g.
//! `EACCES`), is refused with what to do. The probe connection is closed at once.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Prepares `path` for `bind` (see the module docs). `what` names the setting for
/// messages (`mgmt-socket`, `nbd-socket`).
pub fn clear_stale(path: &Path, what: &str) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it or choose another {what}",
                path.display()
            ),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => {
            let who = listener_pid(s).map_or_else(
                || "another process".to_string(),
                |pid| format!("process {pid}"),
            );
            Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: {who} is listening on it (another tandem of this node?); \
                     stop it, or choose another {what}",
                    path.display()
                ),
            ))
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            tracing::info!("replacing the stale socket file {}", path.display());
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!(
                "cannot tell whether a server listens on {} (connect: {e}); remove it if \
                 none does, or choose another {what}",
                path.display()
            ),
        )),
    }
}

/// The pid of the process that listens on the other end of `s` (`SO_PEERCRED`), when a
/// runtime is at hand to ask.
fn listener_pid(s: std::os::unix::net::UnixStream) -> Option<i32> {
    tokio::runtime::Handle::try_current().ok()?;
    s.set_nonblocking(true).ok()?;
    let s = tokio::net::UnixStream::from_std(s).ok()?;
    s.peer_cred().ok()?.pid()
}
