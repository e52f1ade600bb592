//! The resource configuration: one TOML file per resource, shared by both nodes.
//!
//! Option names are DRBD's (`protocol`, `ping-int`, `ping-timeout`, `connect-int`,
//! `timeout`, `ko-count`, `max-buffers`, `max-epoch-size`, `sndbuf-size`, `rcvbuf-size`, the
//! split-brain policies and digests of `net`, the resync-rate controller of `disk`) with
//! DRBD's units, limits and (except for the rate controller, whose defaults are
//! [`RateConfig::TANDEM`], tuned for a 10 Gbit/s link) DRBD's defaults, so an operator who
//! knows `drbd.conf` can read it. Rates and sizes also take DRBD's suffixes: a plain number
//! is in the option's unit (KiB/s, sectors), `"1200M"` is bytes (binary K/M/G). Every value is
//! range-checked when the file is loaded; an error names the key and says what to change
//! (a bad config never starts a half-configured node). The file is untrusted input: at most
//! 1 MiB is read, at most [`MAX_NODES`] nodes are accepted.
//!
//! ```toml
//! [resource]
//! name = "r0"
//! protocol = "C"            # A, B or C (DRBD's replication protocols)
//! size = "64MiB"            # optional: create backing files of this size when missing
//!
//! [net]                     # optional; DRBD's names, units and defaults
//! ping-int = 10             # seconds of meta-socket silence before a P_PING
//! ping-timeout = 5          # tenths of a second to wait for P_PING_ACK, else the peer is dead
//! connect-int = 10          # seconds, upper bound of the reconnect back-off
//! timeout = 60              # tenths of a second: a write unanswered this long sends a P_PING
//! ko-count = 7              # a write unanswered ko-count × timeout drops the peer (0 = never)
//! max-buffers = 2048        # replicated writes in flight, per peer
//! max-epoch-size = 2048     # writes per epoch (between two barriers)
//! after-sb-0pri = "disconnect"  # split-brain policies (DRBD's names); default: resolve nothing
//! after-sb-1pri = "disconnect"
//! after-sb-2pri = "disconnect"
//! always-asbp = false
//! rr-conflict = "disconnect"
//! csums-alg = "crc32c"      # checksum-based resync; only crc32c, or leave out for none
//! csums-after-crash-only = false
//! verify-alg = "crc32c"     # online verify; only crc32c
//! use-rle = true            # run-length encode the bitmap exchange
//!
//! [disk]                    # optional; DRBD's names and defaults
//! al-extents = 1237         # activity log slots of 4 MiB: bounds a crash resync (67..=65534)
//! resync-rate = 102400      # KiB/s: fixed-mode rate and the controller's start-up fill
//! c-plan-ahead = 10         # 0.1 s; 0 = fixed rate (resync-rate)
//! c-fill-target = 65536     # sectors kept in flight (0 = use c-delay-target)
//! c-delay-target = 10       # 0.1 s
//! c-max-rate = "1200M"      # KiB/s, or bytes/s with a suffix
//! c-min-rate = 25600        # KiB/s resync keeps while the application uses the disk
//! rs-discard-granularity = 0  # bytes; thin resync requests (P_RS_THIN_REQ), 0 = off
//!
//! [nbd]                     # optional; limits of the NBD exports
//! idle-timeout = 60         # seconds without a request before a connection may lose its slot
//! data-budget = "256MiB"    # READ/WRITE data in flight over all NBD connections
//!
//! [[node]]
//! name = "alpha"
//! address = "127.0.0.1:7789"
//! disk = "/var/lib/tandem/alpha.img"
//! meta-disk = "internal"    # or a path: flex-external metadata on another device/file
//! role = "primary"
//! nbd-socket = "/run/tandem/r0.nbd"
//! nbd-listen = "127.0.0.1:10809"
//! mgmt-socket = "/run/tandem/r0-alpha.sock"
//!
//! [[node]]
//! name = "beta"
//! address = "127.0.0.1:7790"
//! disk = "/var/lib/tandem/beta.img"
//! ```

use crate::resync::controller::limits;
use crate::resync::{RateConfig, DIGEST_ALG};
use crate::state::uuid::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, RrConflict, SplitBrainPolicy};
use crate::state::Protocol;
use crate::wire::DRBD_MAX_BIO_SIZE;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest config file read, bytes.
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Nodes per resource: tandem replicates between exactly two.
pub(crate) const MAX_NODES: usize = 2;
/// Largest volume, bytes: DRBD's `DRBD_MAX_SECTORS_FLEX`, 1 PiB.
pub(crate) const MAX_VOLUME_BYTES: u64 = 1 << 50;

/// A configuration error; the message names the key and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown/mistyped key.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The TOML parser's message (it names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The key, e.g. `net.ping-timeout` or `node[1].address`.
        key: String,
        /// What is wrong and what to change.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Initial role of a node when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InitialRole {
    /// Serves the volume read-write and replicates to the peer.
    Primary,
    /// Receives the peer's writes; exports nothing writable.
    #[default]
    Secondary,
}

/// `[resource]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceConfig {
    /// Resource name (also the NBD export name).
    pub name: String,
    /// Replication protocol.
    pub protocol: Protocol,
    /// Create missing backing files with this size, bytes.
    pub size_bytes: Option<u64>,
}

/// `[net]`, with DRBD's units converted to durations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Idle time on the meta socket before a ping (DRBD `ping-int`, s).
    pub ping_interval: Duration,
    /// Time to wait for a ping ack (DRBD `ping-timeout`, 0.1 s).
    pub ping_timeout: Duration,
    /// Upper bound of the reconnect back-off (DRBD `connect-int`, s).
    pub connect_interval: Duration,
    /// DRBD `timeout` (0.1 s): a write (or barrier) the peer has not answered for this
    /// long, or a send blocked this long, makes the node ping the peer at once; no answer
    /// within `ping_timeout` and the peer is dead (see `net::liveness`).
    pub timeout: Duration,
    /// DRBD `ko-count`: a peer that answers pings but leaves a write unanswered for
    /// `ko_count × timeout` (or a send blocked that long) is dropped; 0 = never.
    pub ko_count: u32,
    /// Replicated writes in flight per peer (DRBD `max-buffers`).
    pub max_buffers: u32,
    /// Writes per epoch (DRBD `max-epoch-size`).
    pub max_epoch_size: u32,
    /// Socket send buffer, bytes (0 = kernel auto-tuning).
    pub sndbuf_size: u32,
    /// Socket receive buffer, bytes (0 = kernel auto-tuning).
    pub rcvbuf_size: u32,
    /// `after-sb-0pri`, `after-sb-1pri`, `after-sb-2pri`, `always-asbp`, `rr-conflict`:
    /// what the handshake after a split brain does (default: disconnect, nothing
    /// overwritten).
    pub split_brain: SplitBrainPolicy,
    /// `csums-alg`: `Some("crc32c")` ([`DIGEST_ALG`], the only one tandem computes) for
    /// checksum-based resync, `None` to send every out-of-sync block.
    pub csums_alg: Option<String>,
    /// `csums-after-crash-only`: use `csums-alg` only for the resync after a Primary
    /// crashed (DRBD 8.4.5+); default false.
    pub csums_after_crash_only: bool,
    /// `verify-alg`: `Some("crc32c")` enables online verify; `None` refuses it.
    pub verify_alg: Option<String>,
    /// `use-rle`: run-length encode the bitmap exchange (`P_COMPRESSED_BITMAP`); default
    /// true.
    pub use_rle: bool,
}

/// `[nbd]`: limits of the NBD exports (both listeners of a node share them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// A connection with no request for this long may lose its slot to a new client
    /// (`idle-timeout`, s).
    pub idle_timeout: Duration,
    /// READ/WRITE data in flight over all NBD connections (`data-budget`, bytes).
    pub data_budget: u64,
}

/// `[disk]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Activity-log slots (DRBD `al-extents`): a crash resyncs at most this × 4 MiB.
    pub al_extents: u32,
    /// The resync-rate controller: `resync-rate`, `c-plan-ahead`, `c-fill-target`,
    /// `c-delay-target`, `c-max-rate`, `c-min-rate`, each defaulting to
    /// [`RateConfig::TANDEM`] and checked against DRBD's [`limits`]. `max_buffers` is
    /// always `RateConfig::TANDEM.max_buffers` (81,920), not `net.max-buffers`: in tandem
    /// it bounds resync requests in flight, not receive memory, and DRBD's 2048 would cap
    /// the resync at 40 MiB/s.
    pub rate: RateConfig,
    /// `rs-discard-granularity`, bytes: 0 (default) = off, else a power of two
    /// 4096..=1 MiB, the size of a thin resync request (`P_RS_THIN_REQ`) when the peer
    /// agrees to `DRBD_FF_THIN_RESYNC`.
    pub rs_discard_granularity: u32,
    /// What a failed write to the local disk does (DRBD `on-io-error`).
    pub on_io_error: OnIoError,
}

/// DRBD's `on-io-error`: what a node does when a write to its own disk fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnIoError {
    /// `detach` (default): the disk leaves service (`Failed`; a Primary becomes
    /// `Diskless` and serves through its peer): later writes are not applied to it, it
    /// is never UpToDate again without a resync, and it cannot be promoted. A restart
    /// attaches it again; the resync from the peer repairs it (a full one after
    /// Diskless).
    #[default]
    Detach,
    /// `pass_on`: the disk stays in service but becomes `Inconsistent`; the failed blocks
    /// are marked out of sync and resynced from the peer at once (the connection is
    /// renewed so that the handshake starts that resync).
    PassOn,
}

impl OnIoError {
    /// DRBD's spelling.
    pub fn name(self) -> &'static str {
        match self {
            OnIoError::Detach => "detach",
            OnIoError::PassOn => "pass_on",
        }
    }
}

/// `[startup]` (DRBD's `startup` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupConfig {
    /// How long a node whose `role` is `"primary"` waits for its peer at start before it
    /// decides alone (DRBD `wfc-timeout`); `Duration::ZERO` waits forever.
    pub wfc_timeout: Duration,
}

/// Where a node keeps its DRBD 9 metadata (DRBD's `meta-disk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaDisk {
    /// At the end of the backing device (`meta-disk internal`).
    Internal,
    /// On its own device or file, all of it (`flex-external`).
    External(PathBuf),
}

/// One `[[node]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node name, unique in the resource.
    pub name: String,
    /// Replication address this node listens on.
    pub address: SocketAddr,
    /// Backing file or block device.
    pub disk: PathBuf,
    /// Where the metadata lives.
    pub meta_disk: MetaDisk,
    /// Role at start.
    pub role: InitialRole,
    /// NBD export on a Unix socket.
    pub nbd_socket: Option<PathBuf>,
    /// NBD export on TCP.
    pub nbd_listen: Option<SocketAddr>,
    /// Management socket.
    pub mgmt_socket: PathBuf,
}

/// A validated resource configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `[resource]`.
    pub resource: ResourceConfig,
    /// `[net]`.
    pub net: NetConfig,
    /// `[disk]`.
    pub disk: DiskConfig,
    /// `[startup]`.
    pub startup: StartupConfig,
    /// `[nbd]`.
    pub nbd: NbdConfig,
    /// The two nodes.
    pub nodes: Vec<NodeConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    resource: RawResource,
    #[serde(default)]
    net: RawNet,
    #[serde(default)]
    disk: RawDisk,
    #[serde(default)]
    startup: RawStartup,
    #[serde(default)]
    nbd: RawNbd,
    #[serde(default, rename = "node")]
    nodes: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: String,
    #[serde(default = "default_protocol")]
    protocol: String,
    size: Option<toml::Value>,
}

fn default_protocol() -> String {
    "C".to_string()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNet {
    ping_int: Option<i64>,
    ping_timeout: Option<i64>,
    connect_int: Option<i64>,
    timeout: Option<i64>,
    ko_count: Option<i64>,
    max_buffers: Option<i64>,
    max_epoch_size: Option<i64>,
    sndbuf_size: Option<toml::Value>,
    rcvbuf_size: Option<toml::Value>,
    after_sb_0pri: Option<String>,
    after_sb_1pri: Option<String>,
    after_sb_2pri: Option<String>,
    always_asbp: Option<bool>,
    rr_conflict: Option<String>,
    csums_alg: Option<String>,
    csums_after_crash_only: Option<bool>,
    verify_alg: Option<String>,
    use_rle: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDisk {
    al_extents: Option<i64>,
    resync_rate: Option<toml::Value>,
    c_plan_ahead: Option<i64>,
    c_fill_target: Option<toml::Value>,
    c_delay_target: Option<i64>,
    c_max_rate: Option<toml::Value>,
    c_min_rate: Option<toml::Value>,
    rs_discard_granularity: Option<toml::Value>,
    on_io_error: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawStartup {
    wfc_timeout: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNbd {
    idle_timeout: Option<i64>,
    data_budget: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNode {
    name: String,
    address: String,
    disk: PathBuf,
    meta_disk: Option<PathBuf>,
    #[serde(default)]
    role: InitialRole,
    nbd_socket: Option<PathBuf>,
    nbd_listen: Option<String>,
    mgmt_socket: Option<PathBuf>,
}

/// Parses a size: an integer number of bytes or a string with a unit
/// (`"512"`, `"4KiB"`, `"64MiB"`, `"8GiB"`, `"1T"`; K/M/G/T are binary as in DRBD).
pub fn parse_size(key: &str, value: &toml::Value) -> Result<u64, ConfigError> {
    let text = match value {
        toml::Value::Integer(n) => {
            return u64::try_from(*n)
                .map_err(|_| invalid(key, format!("{n} is negative; give a size in bytes")));
        }
        toml::Value::String(s) => s.trim().to_string(),
        other => {
            return Err(invalid(
                key,
                format!("expected a size like \"64MiB\", got {other}"),
            ))
        }
    };
    crate::units::parse_size(&text).ok_or_else(|| {
        invalid(
            key,
            format!("\"{text}\" is not a size; write e.g. \"4096\", \"64MiB\" or \"8GiB\""),
        )
    })
}

fn ranged(
    key: &str,
    value: Option<i64>,
    default: i64,
    min: i64,
    max: i64,
    unit: &str,
) -> Result<u64, ConfigError> {
    let v = value.unwrap_or(default);
    check_range(key, v, default, min, max, unit)
}

fn check_range(
    key: &str,
    v: i64,
    default: i64,
    min: i64,
    max: i64,
    unit: &str,
) -> Result<u64, ConfigError> {
    if v < min || v > max {
        return Err(invalid(
            key,
            format!("{v} is out of range; use {min}..={max} ({unit}, default {default})"),
        ));
    }
    u64::try_from(v).map_err(|_| invalid(key, "must not be negative"))
}

/// A `u32` option within DRBD's `limits` (min, max, _) with tandem's `default`.
fn ranged_u32(
    key: &str,
    value: Option<i64>,
    default: u32,
    (min, max, _): (u32, u32, u32),
    unit: &str,
) -> Result<u32, ConfigError> {
    let v = ranged(
        key,
        value,
        i64::from(default),
        i64::from(min),
        i64::from(max),
        unit,
    )?;
    u32::try_from(v).map_err(|_| invalid(key, "too large"))
}

/// A rate or amount in DRBD's style: an integer or a suffix-less string is in the
/// option's unit of `unit_bytes` bytes (KiB/s: 1024, sectors: 512); a string with a
/// suffix (`"1200M"`, `"32MiB"`) is bytes and must be a whole number of units. Then
/// checked against `limits` like [`ranged_u32`].
fn scaled_u32(
    key: &str,
    value: Option<&toml::Value>,
    default: u32,
    limits: (u32, u32, u32),
    unit_bytes: u64,
    unit: &str,
) -> Result<u32, ConfigError> {
    let (min, max, _) = limits;
    let n: i64 = match value {
        None => i64::from(default),
        Some(toml::Value::Integer(n)) => *n,
        Some(toml::Value::String(s))
            if !s.trim().is_empty() && s.trim().bytes().all(|b| b.is_ascii_digit()) =>
        {
            // Too many digits to be an i64 is out of range, like any large number.
            s.trim().parse::<i64>().unwrap_or(i64::MAX)
        }
        Some(v @ toml::Value::String(s)) => {
            let bytes = parse_size(key, v)?;
            if bytes % unit_bytes != 0 {
                return Err(invalid(
                    key,
                    format!(
                        "\"{}\" is {bytes} bytes, not a whole number of {unit_bytes}-byte units \
                         ({unit})",
                        s.trim()
                    ),
                ));
            }
            i64::try_from(bytes / unit_bytes).unwrap_or(i64::MAX)
        }
        Some(other) => {
            return Err(invalid(
                key,
                format!("expected a number ({unit}) or a size like \"100M\", got {other}"),
            ))
        }
    };
    let v = check_range(
        key,
        n,
        i64::from(default),
        i64::from(min),
        i64::from(max),
        unit,
    )?;
    u32::try_from(v).map_err(|_| invalid(key, "too large"))
}

/// One of a policy enum's DRBD names; a wrong one lists them all.
fn policy<T: std::str::FromStr + Copy + Default + std::fmt::Display>(
    key: &str,
    value: Option<&str>,
    all: &[T],
) -> Result<T, ConfigError> {
    let Some(text) = value else {
        return Ok(T::default());
    };
    text.trim().parse().map_err(|_| {
        invalid(
            key,
            format!(
                "\"{text}\" is not a policy; use one of {}",
                all.iter()
                    .map(|p| format!("\"{p}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

/// `csums-alg` / `verify-alg`: absent or `""` is none; tandem computes only crc32c.
fn digest_alg(key: &str, value: Option<&str>) -> Result<Option<String>, ConfigError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(DIGEST_ALG) => Ok(Some(DIGEST_ALG.to_string())),
        Some(other) => Err(invalid(
            key,
            format!(
                "\"{other}\" is not supported; tandem computes only \"{DIGEST_ALG}\" (or leave it \
                 out for none)"
            ),
        )),
    }
}

/// `rs-discard-granularity`: bytes, 0 = off, else a power of two 4 KiB..=1 MiB.
fn discard_granularity(key: &str, value: Option<&toml::Value>) -> Result<u32, ConfigError> {
    let Some(value) = value else { return Ok(0) };
    let bytes = parse_size(key, value)?;
    if bytes != 0
        && (!bytes.is_power_of_two() || bytes < 4096 || bytes > u64::from(DRBD_MAX_BIO_SIZE))
    {
        return Err(invalid(
            key,
            format!(
                "{bytes} bytes: use 0 (off) or a power of two from 4096 (4KiB) to \
                 {DRBD_MAX_BIO_SIZE} (1MiB)"
            ),
        ));
    }
    u32::try_from(bytes).map_err(|_| invalid(key, "too large"))
}

fn buf_size(key: &str, value: Option<&toml::Value>) -> Result<u32, ConfigError> {
    let Some(value) = value else { return Ok(0) };
    let bytes = parse_size(key, value)?;
    if bytes > 64 << 20 {
        return Err(invalid(
            key,
            format!("{bytes} bytes is too large; use 0 (auto) up to 64MiB"),
        ));
    }
    u32::try_from(bytes).map_err(|_| invalid(key, "too large"))
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(invalid(
                "(file)",
                format!("larger than {MAX_CONFIG_BYTES} bytes; this is not a tandem config"),
            ));
        }
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let name = raw.resource.name.trim().to_string();
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "resource.name",
                format!(
                    "\"{}\" is not a valid name; use 1-64 characters of A-Z a-z 0-9 - _ .",
                    raw.resource.name
                ),
            ));
        }
        let protocol = match raw.resource.protocol.trim() {
            "A" | "a" => Protocol::A,
            "B" | "b" => Protocol::B,
            "C" | "c" => Protocol::C,
            other => {
                return Err(invalid(
                    "resource.protocol",
                    format!("\"{other}\" is not a protocol; use \"A\", \"B\" or \"C\""),
                ))
            }
        };
        let size_bytes = match &raw.resource.size {
            None => None,
            Some(v) => {
                let bytes = parse_size("resource.size", v)?;
                if bytes == 0 || bytes % 4096 != 0 || bytes > MAX_VOLUME_BYTES {
                    return Err(invalid(
                        "resource.size",
                        format!(
                            "{bytes} bytes: a size must be a non-zero multiple of 4KiB up to 1PiB"
                        ),
                    ));
                }
                Some(bytes)
            }
        };
        let n = &raw.net;
        let net = NetConfig {
            ping_interval: Duration::from_secs(ranged(
                "net.ping-int",
                n.ping_int,
                10,
                1,
                120,
                "seconds",
            )?),
            ping_timeout: Duration::from_millis(
                100 * ranged(
                    "net.ping-timeout",
                    n.ping_timeout,
                    5,
                    1,
                    300,
                    "tenths of a second",
                )?,
            ),
            connect_interval: Duration::from_secs(ranged(
                "net.connect-int",
                n.connect_int,
                10,
                1,
                120,
                "seconds",
            )?),
            timeout: Duration::from_millis(
                100 * ranged("net.timeout", n.timeout, 60, 1, 600, "tenths of a second")?,
            ),
            ko_count: u32::try_from(ranged("net.ko-count", n.ko_count, 7, 0, 200, "timeouts")?)
                .map_err(|_| invalid("net.ko-count", "too large"))?,
            max_buffers: u32::try_from(ranged(
                "net.max-buffers",
                n.max_buffers,
                2048,
                32,
                131072,
                "writes",
            )?)
            .map_err(|_| invalid("net.max-buffers", "too large"))?,
            max_epoch_size: u32::try_from(ranged(
                "net.max-epoch-size",
                n.max_epoch_size,
                2048,
                1,
                20000,
                "writes",
            )?)
            .map_err(|_| invalid("net.max-epoch-size", "too large"))?,
            sndbuf_size: buf_size("net.sndbuf-size", n.sndbuf_size.as_ref())?,
            rcvbuf_size: buf_size("net.rcvbuf-size", n.rcvbuf_size.as_ref())?,
            split_brain: SplitBrainPolicy {
                after_sb_0pri: policy(
                    "net.after-sb-0pri",
                    n.after_sb_0pri.as_deref(),
                    AfterSb0Pri::ALL,
                )?,
                after_sb_1pri: policy(
                    "net.after-sb-1pri",
                    n.after_sb_1pri.as_deref(),
                    AfterSb1Pri::ALL,
                )?,
                after_sb_2pri: policy(
                    "net.after-sb-2pri",
                    n.after_sb_2pri.as_deref(),
                    AfterSb2Pri::ALL,
                )?,
                always_asbp: n.always_asbp.unwrap_or(false),
                rr_conflict: policy("net.rr-conflict", n.rr_conflict.as_deref(), RrConflict::ALL)?,
            },
            csums_alg: digest_alg("net.csums-alg", n.csums_alg.as_deref())?,
            csums_after_crash_only: n.csums_after_crash_only.unwrap_or(false),
            verify_alg: digest_alg("net.verify-alg", n.verify_alg.as_deref())?,
            use_rle: n.use_rle.unwrap_or(true),
        };
        let d = &raw.disk;
        let t = RateConfig::TANDEM;
        let rate = RateConfig {
            resync_rate: scaled_u32(
                "disk.resync-rate",
                d.resync_rate.as_ref(),
                t.resync_rate,
                limits::RESYNC_RATE,
                1024,
                "KiB/s",
            )?,
            c_plan_ahead: ranged_u32(
                "disk.c-plan-ahead",
                d.c_plan_ahead,
                t.c_plan_ahead,
                limits::C_PLAN_AHEAD,
                "tenths of a second, 0 = fixed rate",
            )?,
            c_delay_target: ranged_u32(
                "disk.c-delay-target",
                d.c_delay_target,
                t.c_delay_target,
                limits::C_DELAY_TARGET,
                "tenths of a second",
            )?,
            c_fill_target: scaled_u32(
                "disk.c-fill-target",
                d.c_fill_target.as_ref(),
                t.c_fill_target,
                limits::C_FILL_TARGET,
                512,
                "sectors",
            )?,
            c_max_rate: scaled_u32(
                "disk.c-max-rate",
                d.c_max_rate.as_ref(),
                t.c_max_rate,
                limits::C_MAX_RATE,
                1024,
                "KiB/s",
            )?,
            c_min_rate: scaled_u32(
                "disk.c-min-rate",
                d.c_min_rate.as_ref(),
                t.c_min_rate,
                limits::C_MIN_RATE,
                1024,
                "KiB/s",
            )?,
            max_buffers: t.max_buffers,
        };
        // Every value was checked above; this keeps the two in step if RateConfig grows
        // a cross-field rule.
        rate.validate()
            .map_err(|e| invalid(format!("disk.{}", e.name), e.to_string()))?;
        let disk = DiskConfig {
            al_extents: u32::try_from(ranged(
                "disk.al-extents",
                raw.disk.al_extents,
                1237,
                67,
                65534,
                "4 MiB extents",
            )?)
            .map_err(|_| invalid("disk.al-extents", "too large"))?,
            rate,
            rs_discard_granularity: discard_granularity(
                "disk.rs-discard-granularity",
                d.rs_discard_granularity.as_ref(),
            )?,
            on_io_error: match d.on_io_error.as_deref() {
                None | Some("detach") => OnIoError::Detach,
                Some("pass_on") => OnIoError::PassOn,
                Some(other) => {
                    return Err(invalid(
                        "disk.on-io-error",
                        format!("{other:?} is not supported; use \"detach\" or \"pass_on\""),
                    ))
                }
            },
        };
        let startup = StartupConfig {
            wfc_timeout: Duration::from_secs(ranged(
                "startup.wfc-timeout",
                raw.startup.wfc_timeout,
                10,
                0,
                300000,
                "seconds, 0 = wait forever",
            )?),
        };
        if net.ping_timeout >= net.ping_interval {
            return Err(invalid(
                "net.ping-timeout",
                "must be shorter than net.ping-int",
            ));
        }
        if raw.nodes.len() != MAX_NODES {
            return Err(invalid(
                "node",
                format!(
                    "{} [[node]] sections; a resource needs exactly two (this node and its peer)",
                    raw.nodes.len()
                ),
            ));
        }
        let mut nodes = Vec::with_capacity(MAX_NODES);
        for (i, rn) in raw.nodes.into_iter().enumerate() {
            let key = |k: &str| format!("node[{i}].{k}");
            let node_name = rn.name.trim().to_string();
            if node_name.is_empty()
                || node_name.len() > 64
                || !node_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(invalid(
                    key("name"),
                    format!(
                        "\"{}\" is not a valid node name; use 1-64 characters of A-Z a-z 0-9 - _ .",
                        rn.name
                    ),
                ));
            }
            let address: SocketAddr = rn.address.parse().map_err(|_| {
                invalid(
                    key("address"),
                    format!(
                        "\"{}\" is not an address; write IP:PORT, e.g. \"10.0.0.1:7789\"",
                        rn.address
                    ),
                )
            })?;
            if address.port() == 0 {
                return Err(invalid(
                    key("address"),
                    "port 0 is not a listening port; pick one, e.g. 7789",
                ));
            }
            let nbd_listen = match rn.nbd_listen {
                None => None,
                Some(s) => Some(s.parse::<SocketAddr>().map_err(|_| {
                    invalid(
                        key("nbd-listen"),
                        format!(
                            "\"{s}\" is not an address; write IP:PORT, e.g. \"127.0.0.1:10809\""
                        ),
                    )
                })?),
            };
            if rn.disk.as_os_str().is_empty() {
                return Err(invalid(
                    key("disk"),
                    "empty path; name a backing file or block device",
                ));
            }
            let meta_disk = match rn.meta_disk {
                None => MetaDisk::Internal,
                Some(p) if p.as_os_str() == "internal" => MetaDisk::Internal,
                Some(p) if p.as_os_str().is_empty() || p == rn.disk => {
                    return Err(invalid(
                        key("meta-disk"),
                        "use \"internal\" or the path of another device or file",
                    ))
                }
                Some(p) => MetaDisk::External(p),
            };
            let mgmt_socket = rn
                .mgmt_socket
                .unwrap_or_else(|| PathBuf::from(format!("/run/tandem/{name}-{node_name}.sock")));
            nodes.push(NodeConfig {
                name: node_name,
                address,
                disk: rn.disk,
                meta_disk,
                role: rn.role,
                nbd_socket: rn.nbd_socket,
                nbd_listen,
                mgmt_socket,
            });
        }
        if nodes[0].name == nodes[1].name {
            return Err(invalid(
                "node[1].name",
                format!(
                    "\"{}\" is used twice; node names must differ",
                    nodes[1].name
                ),
            ));
        }
        if nodes[0].address == nodes[1].address {
            return Err(invalid(
                "node[1].address",
                "both nodes listen on the same address; give each its own port or IP",
            ));
        }
        if nodes.iter().all(|n| n.role == InitialRole::Primary) {
            return Err(invalid(
                "node[1].role",
                "both nodes are primary; only one node may start as primary",
            ));
        }
        let nbd = NbdConfig {
            idle_timeout: Duration::from_secs(ranged(
                "nbd.idle-timeout",
                raw.nbd.idle_timeout,
                60,
                1,
                86400,
                "seconds",
            )?),
            data_budget: match &raw.nbd.data_budget {
                None => 256 << 20,
                Some(v) => {
                    let b = parse_size("nbd.data-budget", v)?;
                    if !(32 << 20..=16 << 30).contains(&b) {
                        return Err(invalid(
                            "nbd.data-budget",
                            format!(
                                "{b} bytes is out of range; use 32MiB..=16GiB (default 256MiB)"
                            ),
                        ));
                    }
                    b
                }
            },
        };
        Ok(Config {
            resource: ResourceConfig {
                name,
                protocol,
                size_bytes,
            },
            net,
            disk,
            startup,
            nbd,
            nodes,
        })
    }

    /// This node and its peer, by this node's name.
    pub fn split(&self, me: &str) -> Result<(&NodeConfig, &NodeConfig), ConfigError> {
        match (self.nodes.first(), self.nodes.get(1)) {
            (Some(a), Some(b)) if a.name == me => Ok((a, b)),
            (Some(a), Some(b)) if b.name == me => Ok((b, a)),
            _ => Err(invalid(
                "--node",
                format!(
                    "no node named \"{me}\" in this config; it has {}",
                    self.nodes
                        .iter()
                        .map(|n| format!("\"{}\"", n.name))
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            )),
        }
    }

    /// The config used by `tandem demo`: two nodes on loopback, files under `dir`.
    pub fn demo_text(dir: &Path, size: &str, protocol: &str) -> String {
        let d = dir.display();
        format!(
            r#"# tandem demo: two nodes on loopback with file backends.
[resource]
name = "demo"
protocol = "{protocol}"
size = "{size}"

[net]
connect-int = 1

[[node]]
name = "alpha"
address = "127.0.0.1:7789"
disk = "{d}/alpha.img"
role = "primary"
nbd-socket = "{d}/demo.nbd"
nbd-listen = "127.0.0.1:10809"
mgmt-socket = "{d}/alpha.sock"

[[node]]
name = "beta"
address = "127.0.0.1:7790"
disk = "{d}/beta.img"
mgmt-socket = "{d}/beta.sock"
"#
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_nodes(extra_res: &str, extra_net: &str) -> String {
        format!(
            "[resource]\nname = \"r0\"\n{extra_res}\n[net]\n{extra_net}\n\
             [[node]]\nname = \"a\"\naddress = \"127.0.0.1:7789\"\ndisk = \"/tmp/a\"\nrole = \
             \"primary\"\n[[node]]\nname = \"b\"\naddress = \"127.0.0.1:7790\"\ndisk = \
             \"/tmp/b\"\n"
        )
    }

    fn err(text: &str) -> String {
        match Config::parse(text, "t.toml") {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_are_drbds() {
        let c = Config::parse(&two_nodes("", ""), "t").expect("valid");
        assert_eq!(c.resource.protocol, Protocol::C);
        assert_eq!(c.net.ping_interval, Duration::from_secs(10));
        assert_eq!(c.net.ping_timeout, Duration::from_millis(500));
        assert_eq!(c.net.timeout, Duration::from_secs(6));
        assert_eq!(c.net.ko_count, 7);
        assert_eq!(c.net.max_buffers, 2048);
        assert_eq!(c.net.max_epoch_size, 2048);
        let (me, peer) = c.split("b").expect("b");
        assert_eq!((me.name.as_str(), peer.name.as_str()), ("b", "a"));
        assert_eq!(me.mgmt_socket, PathBuf::from("/run/tandem/r0-b.sock"));
        assert_eq!(c.disk.al_extents, 1237);
        assert_eq!(me.meta_disk, MetaDisk::Internal);
    }

    #[test]
    fn disk_options() {
        let with = |extra: &str| format!("{}\n[disk]\n{extra}\n", two_nodes("", ""));
        let c = Config::parse(&with("al-extents = 67"), "t").expect("valid");
        assert_eq!(c.disk.al_extents, 67);
        assert!(err(&with("al-extents = 66")).contains("disk.al-extents"));
        assert!(err(&with("al-extents = 65535")).contains("67..=65534"));
        let ext = two_nodes("", "").replace(
            "disk = \"/tmp/b\"",
            "disk = \"/tmp/b\"\nmeta-disk = \"/tmp/b.md\"",
        );
        let c = Config::parse(&ext, "t").expect("valid");
        assert_eq!(c.nodes[1].meta_disk, MetaDisk::External("/tmp/b.md".into()));
        let same = ext.replace("/tmp/b.md", "/tmp/b");
        assert!(err(&same).contains("node[1].meta-disk"));
        let internal = ext.replace("/tmp/b.md", "internal");
        let c = Config::parse(&internal, "t").expect("valid");
        assert_eq!(c.nodes[1].meta_disk, MetaDisk::Internal);
    }

    #[test]
    fn on_io_error_and_startup_options() {
        let c = Config::parse(&two_nodes("", ""), "t").expect("valid");
        assert_eq!(c.disk.on_io_error, OnIoError::Detach);
        assert_eq!(c.startup.wfc_timeout, Duration::from_secs(10));
        let with = |extra: &str| format!("{}\n{extra}\n", two_nodes("", ""));
        let c = Config::parse(&with("[disk]\non-io-error = \"pass_on\""), "t").expect("valid");
        assert_eq!(c.disk.on_io_error, OnIoError::PassOn);
        let e = err(&with("[disk]\non-io-error = \"call-local-io-error\""));
        assert!(
            e.contains("disk.on-io-error") && e.contains("pass_on"),
            "{e}"
        );
        let c = Config::parse(&with("[startup]\nwfc-timeout = 0"), "t").expect("valid");
        assert_eq!(c.startup.wfc_timeout, Duration::ZERO);
        assert!(err(&with("[startup]\nwfc-timeout = -1")).contains("startup.wfc-timeout"));
        assert!(err(&with("[startup]\nbecome-primary-on = \"a\"")).contains("become-primary-on"));
    }

    #[test]
    fn resync_and_split_brain_defaults() {
        let c = Config::parse(&two_nodes("", ""), "t").expect("valid");
        assert_eq!(c.disk.rate, RateConfig::TANDEM);
        assert_eq!(c.disk.rs_discard_granularity, 0);
        assert_eq!(c.net.split_brain, SplitBrainPolicy::default());
        assert_eq!(c.net.split_brain.after_sb_0pri, AfterSb0Pri::Disconnect);
        assert_eq!(c.net.csums_alg, None);
        assert_eq!(c.net.verify_alg, None);
        assert!(!c.net.csums_after_crash_only);
        assert!(c.net.use_rle);
    }

    #[test]
    fn resync_and_split_brain_options() {
        let net = "after-sb-0pri = \"discard-least-changes\"\n\
                   after-sb-1pri = \"consensus\"\n\
                   after-sb-2pri = \"violently-as0p\"\n\
                   always-asbp = true\n\
                   rr-conflict = \"violently\"\n\
                   csums-alg = \"crc32c\"\n\
                   csums-after-crash-only = true\n\
                   verify-alg = \"crc32c\"\n\
                   use-rle = false\n";
        let disk = "resync-rate = 250\nc-plan-ahead = 0\nc-fill-target = \"32MiB\"\n\
                    c-delay-target = 100\nc-max-rate = \"1200M\"\nc-min-rate = \"0\"\n\
                    rs-discard-granularity = \"64KiB\"\n";
        let text = format!("{}\n[disk]\n{disk}", two_nodes("", net));
        let c = Config::parse(&text, "t").expect("valid");
        let sb = c.net.split_brain;
        assert_eq!(sb.after_sb_0pri, AfterSb0Pri::DiscardLeastChanges);
        assert_eq!(sb.after_sb_1pri, AfterSb1Pri::Consensus);
        assert_eq!(sb.after_sb_2pri, AfterSb2Pri::ViolentlyAs0p);
        assert!(sb.always_asbp);
        assert_eq!(sb.rr_conflict, RrConflict::Violently);
        assert_eq!(c.net.csums_alg.as_deref(), Some("crc32c"));
        assert!(c.net.csums_after_crash_only);
        assert_eq!(c.net.verify_alg.as_deref(), Some("crc32c"));
        assert!(!c.net.use_rle);
        assert_eq!(
            c.disk.rate,
            RateConfig {
                resync_rate: 250,
                c_plan_ahead: 0,
                c_fill_target: 65_536,
                c_delay_target: 100,
                c_max_rate: 1_228_800,
                c_min_rate: 0,
                max_buffers: RateConfig::TANDEM.max_buffers,
            }
        );
        assert_eq!(c.disk.rs_discard_granularity, 64 << 10);
        // An empty algorithm is none, as in drbd.conf.
        let c = Config::parse(&two_nodes("", "csums-alg = \"\""), "t").expect("valid");
        assert_eq!(c.net.csums_alg, None);
        // Every after-sb name DRBD documents is accepted by its own key.
        for p in AfterSb0Pri::ALL {
            let t = two_nodes("", &format!("after-sb-0pri = \"{p}\""));
            let c = Config::parse(&t, "t").expect("valid");
            assert_eq!(c.net.split_brain.after_sb_0pri, *p);
        }
        for p in AfterSb1Pri::ALL {
            let t = two_nodes("", &format!("after-sb-1pri = \"{p}\""));
            let c = Config::parse(&t, "t").expect("valid");
            assert_eq!(c.net.split_brain.after_sb_1pri, *p);
        }
        // Limits are DRBD's, inclusive at both ends.
        let disk_ok = |extra: &str| {
            Config::parse(&format!("{}\n[disk]\n{extra}\n", two_nodes("", "")), "t")
                .expect("valid")
                .disk
        };
        assert_eq!(disk_ok("c-max-rate = 250").rate.c_max_rate, 250);
        assert_eq!(disk_ok("c-max-rate = \"4G\"").rate.c_max_rate, 4 << 20);
        assert_eq!(disk_ok("resync-rate = \"8G\"").rate.resync_rate, 8 << 20);
        assert_eq!(disk_ok("c-plan-ahead = 300").rate.c_plan_ahead, 300);
        assert_eq!(disk_ok("c-fill-target = 0").rate.c_fill_target, 0);
        assert_eq!(
            disk_ok("rs-discard-granularity = 4096").rs_discard_granularity,
            4096
        );
        assert_eq!(
            disk_ok("rs-discard-granularity = \"1MiB\"").rs_discard_granularity,
            1 << 20
        );
    }

    #[test]
    fn resync_and_split_brain_errors_name_the_key() {
        let disk = |extra: &str| err(&format!("{}\n[disk]\n{extra}\n", two_nodes("", "")));
        let net = |extra: &str| err(&two_nodes("", extra));
        for (text, key, says) in [
            ("resync-rate = 0", "disk.resync-rate", "1..=8388608"),
            ("resync-rate = \"9G\"", "disk.resync-rate", "out of range"),
            ("resync-rate = -1", "disk.resync-rate", "out of range"),
            (
                "resync-rate = \"99999999999999999999999\"",
                "disk.resync-rate",
                "out of range",
            ),
            (
                "resync-rate = \"1000b\"",
                "disk.resync-rate",
                "whole number of 1024-byte",
            ),
            ("resync-rate = \"fast\"", "disk.resync-rate", "not a size"),
            ("resync-rate = 1.5", "disk.resync-rate", "expected a number"),
            ("c-plan-ahead = 301", "disk.c-plan-ahead", "0..=300"),
            ("c-plan-ahead = -1", "disk.c-plan-ahead", "0..=300"),
            ("c-delay-target = 0", "disk.c-delay-target", "1..=100"),
            (
                "c-fill-target = 1048577",
                "disk.c-fill-target",
                "0..=1048576",
            ),
            (
                "c-fill-target = \"1000b\"",
                "disk.c-fill-target",
                "512-byte",
            ),
            ("c-max-rate = 249", "disk.c-max-rate", "250..=4194304"),
            ("c-max-rate = \"5G\"", "disk.c-max-rate", "out of range"),
            ("c-min-rate = 4194305", "disk.c-min-rate", "0..=4194304"),
            (
                "rs-discard-granularity = 2048",
                "disk.rs-discard-granularity",
                "power of two",
            ),
            (
                "rs-discard-granularity = 12288",
                "disk.rs-discard-granularity",
                "power of two",
            ),
            (
                "rs-discard-granularity = \"2MiB\"",
                "disk.rs-discard-granularity",
                "1MiB",
            ),
            (
                "rs-discard-granularity = -4096",
                "disk.rs-discard-granularity",
                "negative",
            ),
            ("c-max-rat = 250", "c-max-rat", "unknown field"),
        ] {
            let e = disk(text);
            assert!(e.contains(key) && e.contains(says), "{text}: {e}");
        }
        for (text, key, says) in [
            (
                "after-sb-0pri = \"consensus\"",
                "net.after-sb-0pri",
                "\"discard-zero-changes\"",
            ),
            (
                "after-sb-1pri = \"discard-local\"",
                "net.after-sb-1pri",
                "\"discard-secondary\"",
            ),
            (
                "after-sb-2pri = \"discard-secondary\"",
                "net.after-sb-2pri",
                "\"violently-as0p\"",
            ),
            (
                "rr-conflict = \"retry\"",
                "net.rr-conflict",
                "\"call-pri-lost\"",
            ),
            ("csums-alg = \"md5\"", "net.csums-alg", "only \"crc32c\""),
            ("verify-alg = \"sha1\"", "net.verify-alg", "only \"crc32c\""),
            ("always-asbp = \"yes\"", "always-asbp", "bool"),
            ("use-rle = 1", "use-rle", "bool"),
        ] {
            let e = net(text);
            assert!(e.contains(key) && e.contains(says), "{text}: {e}");
        }
    }

    /// The first ```toml block of a markdown or doc text.
    fn toml_block(text: &str) -> String {
        let start = text.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let len = text[start..].find("```").expect("its end");
        text[start..start + len]
            .lines()
            .map(|l| {
                l.strip_prefix("//! ")
                    .unwrap_or(l.strip_prefix("//!").unwrap_or(l))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn documented_examples_are_valid() {
        let readme = Config::parse(&toml_block(include_str!("../../README.md")), "README")
            .expect("README's example");
        assert_eq!(readme.disk.rate.c_max_rate, 1_228_800);
        assert_eq!(readme.net.csums_alg.as_deref(), Some(DIGEST_ALG));
        let here = Config::parse(&toml_block(include_str!("config.rs")), "config.rs")
            .expect("the module docs' example");
        assert_eq!(here.disk.rate, RateConfig::TANDEM);
        assert_eq!(here.net.split_brain, SplitBrainPolicy::default());
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(&two_nodes("protocol = \"D\"", "")).contains("resource.protocol"));
        assert!(err(&two_nodes("size = \"12 parsecs\"", "")).contains("resource.size"));
        assert!(err(&two_nodes("size = 1000", "")).contains("multiple of 4KiB"));
        assert!(err(&two_nodes("", "ping-timeout = 0")).contains("net.ping-timeout"));
        assert!(err(&two_nodes("", "pingint = 3")).contains("pingint"));
        assert!(err(&two_nodes("", "ko-count = 201")).contains("net.ko-count"));
        assert!(err(&two_nodes("", "ko-count = -1")).contains("0..=200"));
        let ko0 = Config::parse(&two_nodes("", "ko-count = 0"), "t").expect("ko-count 0");
        assert_eq!(ko0.net.ko_count, 0);
        assert!(err("[resource]\nname=\"r\"\n").contains("exactly two"));
        let bad_addr = two_nodes("", "").replace("127.0.0.1:7790", "nowhere");
        assert!(err(&bad_addr).contains("node[1].address"));
        let c = Config::parse(&two_nodes("", ""), "t").expect("valid");
        assert!(c
            .split("zed")
            .expect_err("must fail")
            .to_string()
            .contains("\"a\" and \"b\""));
    }

    #[test]
    fn nbd_limits() {
        let c = Config::parse(&two_nodes("", ""), "t").expect("valid");
        assert_eq!(c.nbd.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.nbd.data_budget, 256 << 20);
        let text = two_nodes("", "") + "[nbd]\nidle-timeout = 2\ndata-budget = \"1GiB\"\n";
        let c = Config::parse(&text, "t").expect("valid");
        assert_eq!(c.nbd.idle_timeout, Duration::from_secs(2));
        assert_eq!(c.nbd.data_budget, 1 << 30);
        for bad in [
            "idle-timeout = 0",
            "data-budget = \"1MiB\"",
            "max-clients = 3",
        ] {
            let text = two_nodes("", "") + "[nbd]\n" + bad + "\n";
            let e = err(&text);
            assert!(e.contains("nbd") || e.contains("max-clients"), "{e}");
        }
    }

    #[test]
    fn demo_config_is_valid() {
        let c = Config::parse(
            &Config::demo_text(Path::new("/tmp/x"), "256MiB", "C"),
            "demo",
        )
        .expect("demo");
        assert_eq!(c.resource.size_bytes, Some(256 << 20));
    }

    #[test]
    fn hostile_text_never_panics() {
        for text in [
            "",
            "\0\0\0",
            "[resource",
            "[[node]]\n[[node]]\n[[node]]",
            "resource = 5",
            "[resource]\nname = 5",
        ] {
            assert!(Config::parse(text, "t").is_err());
        }
    }
}
