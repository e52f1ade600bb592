//! The management socket: newline-delimited JSON on a Unix socket.
//!
//! Orchestrators (LINSTOR-style controllers, scripts, `tandem status`) drive a node through
//! this socket. It is created with mode 0600 and every connection's peer credentials are
//! checked (root or the daemon's own user only), because whoever reaches it can demote a
//! Primary. Requests are one JSON object per line, `{"cmd":"status"}`; each gets one line
//! back, `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Input is hostile: a line longer
//! than [`MAX_LINE_BYTES`] (64 KiB) closes that connection; a malformed line gets an error
//! reply and the connection stays usable; at most [`MAX_CONNECTIONS`] (32) clients at
//! once, and when all are taken a new client takes the slot of the one idle longest
//! (waiting for a request line), so idle squatters never lock out `tandem status`; an idle
//! client is dropped after [`IDLE_TIMEOUT`] (10 s without a full request line; `tandem`
//! itself opens one connection per request, `events --follow` too). Warnings a client can
//! cause are rate-limited (`crate::ratelog`).
//! An unforced `secondary` waits up to [`HELD_OPEN_SETTLE`] (1 s) for clients holding
//! the device open to go away before the volume refuses it as "held open".

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// Longest request line, bytes.
pub(crate) const MAX_LINE_BYTES: usize = 64 * 1024;
/// Concurrent management connections.
pub(crate) const MAX_CONNECTIONS: usize = 32;
/// A connection that sends no full request line for this long is closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `secondary` (unforced) waits for clients that hold the device open to go
/// away before it is refused as "held open".
pub(crate) const HELD_OPEN_SETTLE: Duration = Duration::from_secs(1);

/// A management request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The node's state (like `drbdsetup status --json`).
    Status,
    /// Become Primary (serve the volume read-write). `force` (`"force":true`) promotes
    /// a disk that is not UpToDate, declaring its data the good copy (DRBD's
    /// `primary --force`: the initial full sync of a new pair starts from it).
    Primary {
        /// `--force`.
        force: bool,
    },
    /// Become Secondary (stop serving writes). Refused while a frontend client has the
    /// device open for writing (DRBD's "held open"), unless `force` (`"force":true`):
    /// then the clients' next writes fail with EPERM.
    Secondary {
        /// `--force`.
        force: bool,
    },
    /// Drop the replication connection and stay StandAlone.
    Disconnect,
    /// Leave StandAlone and connect to the peer again. `discard_my_data`
    /// (`"discard-my-data":true`): this node loses a split brain.
    Connect {
        /// `--discard-my-data`.
        discard_my_data: bool,
    },
    /// Hold the running resync (`pause-sync`).
    PauseSync,
    /// Let it go on (`resume-sync`).
    ResumeSync,
    /// Declare the local data invalid: a full resync from the peer (`invalidate`).
    Invalidate,
    /// Start online verify against the peer (`verify`); progress and the result are in
    /// the status (`verify`, `last_verify`).
    Verify,
    /// The recorded state events (connections, roles, resync, verify, split brain), the
    /// last `crate::volume::MAX_EVENTS`, each with a sequence number.
    Events,
    /// Start a new data generation (`new-current-uuid`); with `clear_bitmap`
    /// (`"clear-bitmap":true`) on a connected just-created pair, skip the initial sync.
    NewCurrentUuid {
        /// `--clear-bitmap`.
        clear_bitmap: bool,
    },
}

/// Every command name, for error messages.
const COMMANDS: &str = "status, primary, secondary, connect, disconnect, pause-sync, \
                        resume-sync, invalidate, verify, events, new-current-uuid";

impl Request {
    /// The request as one JSON line (what [`parse_request`] reads back).
    pub fn canonical(&self) -> serde_json::Value {
        let (cmd, flag) = match *self {
            Request::Status => ("status", None),
            Request::Primary { force } => ("primary", force.then_some("force")),
            Request::Secondary { force } => ("secondary", force.then_some("force")),
            Request::Disconnect => ("disconnect", None),
            Request::Connect { discard_my_data } => {
                ("connect", discard_my_data.then_some("discard-my-data"))
            }
            Request::PauseSync => ("pause-sync", None),
            Request::ResumeSync => ("resume-sync", None),
            Request::Invalidate => ("invalidate", None),
            Request::Verify => ("verify", None),
            Request::Events => ("events", None),
            Request::NewCurrentUuid { clear_bitmap } => {
                ("new-current-uuid", clear_bitmap.then_some("clear-bitmap"))
            }
        };
        let mut v = serde_json::json!({ "cmd": cmd });
        if let (Some(f), Some(m)) = (flag, v.as_object_mut()) {
            m.insert(f.into(), serde_json::Value::Bool(true));
        }
        v
    }
}

/// The outcome of one request, as a future: a request may wait for the peer (a
/// promotion asks it first, see `state::change`).
pub type Reply<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<serde_json::Value, String>> + Send + 'a>,
>;

/// Executes requests; implemented by the daemon.
pub trait Handler: Send + Sync + 'static {
    /// Runs one request; `Ok` is merged into the reply object, `Err` becomes `error`.
    fn handle(&self, req: Request) -> Reply<'_>;
    /// How many frontend clients have the device open for writing (see
    /// [`HELD_OPEN_SETTLE`]).
    fn open_writers(&self) -> usize {
        0
    }
}

/// Waits (at most [`HELD_OPEN_SETTLE`]) for writers that are going away: a client that
/// just closed its NBD connection is only noticed when the server reads the close, which
/// may come after a `secondary` sent right after it.
async fn settle_open_writers(handler: &dyn Handler) {
    let deadline = tokio::time::Instant::now() + HELD_OPEN_SETTLE;
    while handler.open_writers() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Parses one request line into a request or an error message for the reply.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    const HINT: &str = r#"send one JSON object per line, e.g. {"cmd":"status"}"#;
    let text = std::str::from_utf8(line).map_err(|_| format!("request is not UTF-8; {HINT}"))?;
    let value: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("invalid JSON ({e}); {HINT}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| format!("request is not an object; {HINT}"))?;
    let cmd = obj
        .get("cmd")
        .and_then(|c| c.as_str())
        .ok_or_else(|| format!("no \"cmd\" string; {HINT}"))?;
    // The one optional flag each command takes, if any.
    let flag_name = match cmd {
        "primary" | "secondary" => Some("force"),
        "connect" => Some("discard-my-data"),
        "new-current-uuid" => Some("clear-bitmap"),
        _ => None,
    };
    if let Some(key) = obj
        .keys()
        .find(|k| k.as_str() != "cmd" && Some(k.as_str()) != flag_name)
    {
        return Err(format!(
            "unknown key \"{key}\" for \"{cmd}\"{}",
            flag_name.map_or_else(String::new, |f| format!("; it takes \"{f}\":true"))
        ));
    }
    let flag = match flag_name.and_then(|f| obj.get(f)) {
        None => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => {
            return Err(format!(
                "\"{}\" must be true or false",
                flag_name.unwrap_or("")
            ))
        }
    };
    Ok(match cmd {
        "status" => Request::Status,
        "primary" => Request::Primary { force: flag },
        "secondary" => Request::Secondary { force: flag },
        "disconnect" => Request::Disconnect,
        "connect" => Request::Connect {
            discard_my_data: flag,
        },
        "pause-sync" => Request::PauseSync,
        "resume-sync" => Request::ResumeSync,
        "invalidate" => Request::Invalidate,
        "verify" => Request::Verify,
        "events" => Request::Events,
        "new-current-uuid" => Request::NewCurrentUuid { clear_bitmap: flag },
        other => return Err(format!("unknown command \"{other}\"; known: {COMMANDS}")),
    })
}

fn reply_line(result: Result<serde_json::Value, String>) -> Vec<u8> {
    let v = match result {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("ok".into(), serde_json::Value::Bool(true));
            serde_json::Value::Object(m)
        }
        Ok(other) => serde_json::json!({"ok": true, "result": other}),
        Err(e) => serde_json::json!({"ok": false, "error": e}),
    };
    let mut out = v.to_string().into_bytes();
    out.push(b'\n');
    out
}

/// Binds the socket. A stale socket file is replaced; a socket that a live server still
/// answers on, or a file that is not a socket, is refused (`crate::sockfile`).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    crate::sockfile::clear_stale(path, "mgmt-socket")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the management socket until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    handler: Arc<dyn Handler>,
    mut shutdown: watch::Receiver<bool>,
) {
    let owner_uid = std::fs::metadata(&path).map(|m| m.uid()).unwrap_or(0);
    // (device, inode) of the socket file bound: at the end only that file is removed.
    let own = std::fs::symlink_metadata(&path)
        .map(|m| (m.dev(), m.ino()))
        .ok();
    let table = Arc::new(std::sync::Mutex::new(Clients::default()));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                crate::warn_limited!("mgmt: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 || cred.uid() == owner_uid => {}
            Ok(cred) => {
                crate::warn_limited!(
                    "mgmt: refused connection from uid {} (only root or uid {owner_uid})",
                    cred.uid()
                );
                continue;
            }
            Err(e) => {
                crate::warn_limited!("mgmt: refused connection without peer credentials: {e}");
                continue;
            }
        }
        let client = {
            let mut t = lock(&table);
            if t.clients.len() >= MAX_CONNECTIONS {
                // Full: the client idle longest gives its slot.
                let victim = t
                    .clients
                    .iter()
                    .filter_map(|(id, c)| (*lock(&c.idle_since)).map(|since| (since, *id)))
                    .min();
                match victim.and_then(|(_, id)| t.clients.remove(&id)) {
                    Some(c) => {
                        crate::warn_limited!(
                            "mgmt: {MAX_CONNECTIONS} clients connected; closed the one idle longest"
                        );
                        c.evict.notify_one();
                    }
                    None => {
                        crate::warn_limited!(
                            "mgmt: refused connection: {MAX_CONNECTIONS} clients busy"
                        );
                        continue;
                    }
                }
            }
            let id = t.next;
            t.next += 1;
            let c = Arc::new(Client {
                id,
                idle_since: std::sync::Mutex::new(Some(Instant::now())),
                evict: tokio::sync::Notify::new(),
            });
            t.clients.insert(id, c.clone());
            c
        };
        let handler = handler.clone();
        let table = table.clone();
        tokio::spawn(async move {
            serve_conn(stream, handler, &client).await;
            lock(&table).clients.remove(&client.id);
        });
    }
    let current = std::fs::symlink_metadata(&path)
        .map(|m| (m.dev(), m.ino()))
        .ok();
    if current.is_some() && current == own {
        let _ = std::fs::remove_file(&path);
    }
}

/// One connected management client.
struct Client {
    id: u64,
    /// Since when it waits for a request line (None while a request runs).
    idle_since: std::sync::Mutex<Option<Instant>>,
    /// Asks it to close (its slot went to a new client).
    evict: tokio::sync::Notify,
}

/// The connected clients.
#[derive(Default)]
struct Clients {
    next: u64,
    clients: std::collections::BTreeMap<u64, Arc<Client>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn serve_conn(stream: UnixStream, handler: Arc<dyn Handler>, client: &Client) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(8192, rd);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        *lock(&client.idle_since) = Some(Instant::now());
        let read = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, read_line_bounded(&mut rd, &mut line)) => r,
            () = client.evict.notified() => return,
        };
        match read {
            Err(_) => return,
            Ok(Err(reason)) => {
                if !reason.is_empty() {
                    crate::warn_limited!("mgmt: dropping connection: {reason}");
                }
                return;
            }
            Ok(Ok(())) => {}
        }
        *lock(&client.idle_since) = None;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let result = match parse_request(&line) {
            Ok(req) => {
                if req == (Request::Secondary { force: false }) {
                    settle_open_writers(&*handler).await;
                }
                handler.handle(req).await
            }
            Err(e) => {
                crate::warn_limited!("mgmt: refused malformed request: {e}");
                Err(e)
            }
        };
        if wr.write_all(&reply_line(result)).await.is_err() {
            return;
        }
    }
}

/// Reads one line (without the newline) of at most MAX_LINE_BYTES. `Err("")` on clean EOF.
async fn read_line_bounded<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
    line: &mut Vec<u8>,
) -> Result<(), String> {
    loop {
        let buf = rd
            .fill_buf()
            .await
            .map_err(|e| format!("read error: {e}"))?;
        if buf.is_empty() {
            return if line.is_empty() {
                Err(String::new())
            } else {
                Ok(())
            };
        }
        let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + chunk > MAX_LINE_BYTES {
            return Err(format!(
                "request line longer than {MAX_LINE_BYTES} bytes (malformed)"
            ));
        }
        line.extend_from_slice(&buf[..chunk]);
        rd.consume(if found { chunk + 1 } else { chunk });
        if found {
            return Ok(());
        }
    }
}

/// Sends one request to a management socket and returns the reply object (client side).
pub async fn call(
    path: &Path,
    req: &serde_json::Value,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let fut = async {
        let mut s = UnixStream::connect(path).await?;
        let mut line = req.to_string().into_bytes();
        line.push(b'\n');
        s.write_all(&line).await?;
        let mut rd = BufReader::new(s);
        let mut reply = Vec::new();
        read_line_bounded(&mut rd, &mut reply)
            .await
            .map_err(|e| anyhow::anyhow!("no reply: {e}"))?;
        let v: serde_json::Value = serde_json::from_slice(&reply)?;
        anyhow::Ok(v)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow::anyhow!("{} did not answer within {timeout:?}", path.display()))?
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_garbage_is_refused() {
        assert_eq!(parse_request(br#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(br#" {"cmd":"primary"} "#),
            Ok(Request::Primary { force: false })
        );
        for bad in [
            &b"status"[..],
            b"{}",
            br#"{"cmd":"explode"}"#,
            br#"{"cmd":"status","x":1}"#,
            b"\xff\xfe",
            b"[1,2",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replies_are_one_line() {
        let ok = reply_line(Ok(serde_json::json!({"status": {"role": "Primary"}})));
        assert_eq!(ok.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&ok).expect("json");
        assert_eq!(v["ok"], true);
        let err: serde_json::Value =
            serde_json::from_slice(&reply_line(Err("no".into()))).expect("json");
        assert_eq!(err["ok"], false);
        assert_eq!(err["error"], "no");
    }

    #[tokio::test]
    async fn long_lines_close_only_that_connection() {
        let mut rd = BufReader::new(&b"{\"cmd\":\"status\"}\nxyz"[..]);
        let mut line = Vec::new();
        read_line_bounded(&mut rd, &mut line).await.expect("line");
        assert_eq!(line, br#"{"cmd":"status"}"#);
        let big = vec![b'a'; MAX_LINE_BYTES + 10];
        let mut rd = BufReader::new(&big[..]);
        let mut line = Vec::new();
        assert!(read_line_bounded(&mut rd, &mut line)
            .await
            .expect_err("must fail")
            .contains("longer"));
    }
}
