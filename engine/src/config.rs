//! The resource configuration: one TOML file per resource, shared by both nodes.
//!
//! Option names are DRBD's (`protocol`, `ping-int`, `ping-timeout`, `connect-int`,
//! `timeout`, `max-buffers`, `max-epoch-size`, `sndbuf-size`, `rcvbuf-size`) with DRBD's
//! units and defaults, so an operator who knows `drbd.conf` can read it. Every value is
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
//! ping-int = 10             # seconds of silence before a P_PING
//! ping-timeout = 5          # tenths of a second to wait for P_PING_ACK
//! connect-int = 10          # seconds, upper bound of the reconnect back-off
//! timeout = 60              # tenths of a second: a peer that acks nothing for this long is dead
//! max-buffers = 2048        # replicated writes in flight, per peer
//! max-epoch-size = 2048     # writes per epoch (between two barriers)
//!
//! [disk]                    # optional; DRBD's names and defaults
//! al-extents = 1237         # activity log slots of 4 MiB: bounds a crash resync (67..=65534)
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

use crate::state::Protocol;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest config file read, bytes.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Nodes per resource: tandem replicates between exactly two.
pub const MAX_NODES: usize = 2;
/// Largest volume, bytes: DRBD's `DRBD_MAX_SECTORS_FLEX`, 1 PiB.
pub const MAX_VOLUME_BYTES: u64 = 1 << 50;

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
    /// A peer that has not answered for this long is declared dead (DRBD `timeout`, 0.1 s).
    pub timeout: Duration,
    /// Replicated writes in flight per peer (DRBD `max-buffers`).
    pub max_buffers: u32,
    /// Writes per epoch (DRBD `max-epoch-size`).
    pub max_epoch_size: u32,
    /// Socket send buffer, bytes (0 = kernel auto-tuning).
    pub sndbuf_size: u32,
    /// Socket receive buffer, bytes (0 = kernel auto-tuning).
    pub rcvbuf_size: u32,
}

/// `[disk]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Activity-log slots (DRBD `al-extents`): a crash resyncs at most this × 4 MiB.
    pub al_extents: u32,
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
    max_buffers: Option<i64>,
    max_epoch_size: Option<i64>,
    sndbuf_size: Option<toml::Value>,
    rcvbuf_size: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDisk {
    al_extents: Option<i64>,
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
    parse_size_str(&text).ok_or_else(|| {
        invalid(
            key,
            format!("\"{text}\" is not a size; write e.g. \"4096\", \"64MiB\" or \"8GiB\""),
        )
    })
}

/// Parses `"64MiB"`-style sizes; `None` when malformed or overflowing.
pub fn parse_size_str(text: &str) -> Option<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
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
    if v < min || v > max {
        return Err(invalid(
            key,
            format!("{v} is out of range; use {min}..={max} ({unit}, default {default})"),
        ));
    }
    u64::try_from(v).map_err(|_| invalid(key, "must not be negative"))
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
        };
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
        Ok(Config {
            resource: ResourceConfig {
                name,
                protocol,
                size_bytes,
            },
            net,
            disk,
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
             [[node]]\nname = \"a\"\naddress = \"127.0.0.1:7789\"\ndisk = \"/tmp/a\"\nrole = \"primary\"\n\
             [[node]]\nname = \"b\"\naddress = \"127.0.0.1:7790\"\ndisk = \"/tmp/b\"\n"
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
    fn errors_name_the_key() {
        assert!(err(&two_nodes("protocol = \"D\"", "")).contains("resource.protocol"));
        assert!(err(&two_nodes("size = \"12 parsecs\"", "")).contains("resource.size"));
        assert!(err(&two_nodes("size = 1000", "")).contains("multiple of 4KiB"));
        assert!(err(&two_nodes("", "ping-timeout = 0")).contains("net.ping-timeout"));
        assert!(err(&two_nodes("", "pingint = 3")).contains("pingint"));
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
    fn sizes() {
        assert_eq!(parse_size_str("64MiB"), Some(64 << 20));
        assert_eq!(parse_size_str("8G"), Some(8 << 30));
        assert_eq!(parse_size_str("4096"), Some(4096));
        assert_eq!(parse_size_str("99999999999999999999T"), None);
        assert_eq!(parse_size_str("MiB"), None);
        assert_eq!(parse_size_str("1 parsec"), None);
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
