//! A client of the management socket: newline-delimited JSON over a Unix socket.
//!
//! Request `{"cmd":"status"}\n`, reply `{"ok":true,"status":{...}}\n`; a bad line gets
//! `{"ok":false,"error":"..."}\n` and the connection stays usable. Reads and writes time out
//! after [`IO_TIMEOUT`]; a reply line longer than [`MAX_REPLY`] is an error.

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Deadline of one read or write on the socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest reply line accepted.
pub const MAX_REPLY: u64 = 1 << 20;

/// One connection to a management socket.
#[derive(Debug)]
pub struct MgmtConn {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl MgmtConn {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        let s = UnixStream::connect(path)
            .with_context(|| format!("connect to management socket {}", path.display()))?;
        s.set_read_timeout(Some(crate::scaled(IO_TIMEOUT)))?;
        s.set_write_timeout(Some(crate::scaled(IO_TIMEOUT)))?;
        let r = s.try_clone()?;
        Ok(MgmtConn {
            writer: s,
            reader: BufReader::new(r),
        })
    }

    /// Sends raw bytes as they are (hostile tests send garbage on purpose).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    /// Reads one reply line; `Ok(None)` when the daemon closed the connection.
    pub fn read_line(&mut self) -> anyhow::Result<Option<String>> {
        let mut buf = Vec::new();
        let n = self
            .reader
            .by_ref()
            .take(MAX_REPLY)
            .read_until(b'\n', &mut buf)
            .context("read from management socket")?;
        if n == 0 {
            return Ok(None);
        }
        if buf.last() != Some(&b'\n') {
            if n as u64 >= MAX_REPLY {
                bail!("management reply longer than {MAX_REPLY} bytes");
            }
            bail!(
                "management connection closed in the middle of a reply: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        Ok(Some(String::from_utf8_lossy(&buf).trim_end().to_string()))
    }

    /// Sends `line` (a newline is appended) and parses the one-line JSON reply.
    pub fn request_line(&mut self, line: &str) -> anyhow::Result<Value> {
        let mut msg = line.as_bytes().to_vec();
        msg.push(b'\n');
        self.send_raw(&msg).context("write to management socket")?;
        let reply = self
            .read_line()?
            .ok_or_else(|| anyhow!("management socket closed without a reply"))?;
        serde_json::from_str(&reply).with_context(|| format!("reply is not JSON: {reply:?}"))
    }

    /// Sends `{"cmd":"status"}` and returns the `status` object of an `ok` reply.
    pub fn status(&mut self) -> anyhow::Result<Value> {
        let reply = self.request_line(r#"{"cmd":"status"}"#)?;
        if reply.get("ok") != Some(&Value::Bool(true)) {
            bail!("status refused: {reply}");
        }
        match reply.get("status") {
            Some(s @ Value::Object(_)) => Ok(s.clone()),
            _ => bail!("status reply without a status object: {reply}"),
        }
    }
}

/// One status request on a fresh connection to `path`.
pub fn status(path: &Path) -> anyhow::Result<Value> {
    MgmtConn::connect(path)?.status()
}
