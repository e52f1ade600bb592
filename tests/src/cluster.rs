//! A resource of two `tandem` nodes on 127.0.0.1, each a child process of the test.
//!
//! [`Cluster::new`] makes a temp dir, picks free loopback ports (bind port 0, note it,
//! release), writes the one TOML config both nodes share and (unless told not to) starts
//! both nodes: `alpha` (initial role Primary, index 0) and `beta` (Secondary, index 1).
//! A node's stdout and stderr go to `<dir>/<name>.log` (appended across restarts, with a
//! harness marker line per start). Status is read over the management socket directly.
//!
//! Cleanup: dropping a [`Node`] kills its process (SIGKILL); when the test is panicking it
//! first prints the last [`LOG_TAIL_LINES`] lines of the node's log, so a failure shows
//! what the daemon said. Every wait is bounded by the crate's `*_TIMEOUT` constants.

use crate::logs;
use crate::mgmt;
use crate::tools::send_signal;
use crate::{
    scaled, tandem_bin, try_wait_until, TempDir, CONNECT_TIMEOUT, LOG_TIMEOUT, START_TIMEOUT,
    STOP_TIMEOUT,
};
use serde_json::Value;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Lines of a node's log printed when a test fails.
pub const LOG_TAIL_LINES: usize = 60;

/// DRBD's replication protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Complete when handed to TCP.
    A,
    /// Complete when the peer received it (`P_RECV_ACK`).
    B,
    /// Complete when the peer's disk has it (`P_WRITE_ACK`).
    C,
}

impl Protocol {
    /// The config spelling: "A", "B" or "C".
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::A => "A",
            Protocol::B => "B",
            Protocol::C => "C",
        }
    }
}

/// How to build a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// Label of the temp dir (the test's name, shortened).
    pub label: String,
    /// `[resource] name`.
    pub resource: String,
    /// `[resource] protocol`.
    pub protocol: Protocol,
    /// `[resource] size` (the daemon creates missing backing files with it).
    pub size: String,
    /// `[net]` entries as `(key, raw TOML value)`.
    pub net: Vec<(String, String)>,
    /// `[disk]` entries as `(key, raw TOML value)`.
    pub disk: Vec<(String, String)>,
    /// Give every node flex-external metadata in `<name>.md` beside its backing file.
    pub meta_external: bool,
    /// Give every node an `nbd-socket`.
    pub nbd_unix: bool,
    /// Give every node an `nbd-listen` TCP address.
    pub nbd_tcp: bool,
    /// Start both nodes in [`Cluster::new`].
    pub autostart: bool,
}

impl ClusterOpts {
    /// Protocol C, 64 MiB, NBD on a Unix socket, `connect-int = 1` (reconnect within a
    /// second, so fault tests do not wait on backoff), nodes started.
    pub fn new(label: &str) -> Self {
        ClusterOpts {
            label: label.to_string(),
            resource: "r0".into(),
            protocol: Protocol::C,
            size: "64MiB".into(),
            net: vec![("connect-int".into(), "1".into())],
            disk: Vec::new(),
            meta_external: false,
            nbd_unix: true,
            nbd_tcp: false,
            autostart: true,
        }
    }

    /// Sets the protocol.
    pub fn protocol(mut self, p: Protocol) -> Self {
        self.protocol = p;
        self
    }

    /// Sets the size string (e.g. "32MiB").
    pub fn size(mut self, s: &str) -> Self {
        self.size = s.to_string();
        self
    }

    /// Adds (or replaces) a `[net]` entry; `value` is raw TOML.
    pub fn net(mut self, key: &str, value: &str) -> Self {
        self.net.retain(|(k, _)| k != key);
        self.net.push((key.to_string(), value.to_string()));
        self
    }

    /// Adds (or replaces) a `[disk]` entry; `value` is raw TOML.
    pub fn disk(mut self, key: &str, value: &str) -> Self {
        self.disk.retain(|(k, _)| k != key);
        self.disk.push((key.to_string(), value.to_string()));
        self
    }

    /// Flex-external metadata files instead of internal metadata.
    pub fn meta_external(mut self, on: bool) -> Self {
        self.meta_external = on;
        self
    }

    /// Also serve NBD on TCP.
    pub fn nbd_tcp(mut self, on: bool) -> Self {
        self.nbd_tcp = on;
        self
    }

    /// Whether [`Cluster::new`] starts the nodes.
    pub fn autostart(mut self, on: bool) -> Self {
        self.autostart = on;
        self
    }
}

/// `s` as a TOML basic string (JSON's escapes are valid TOML for these).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

fn path_str(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

/// `n` distinct free TCP ports on 127.0.0.1: all bound at once (so they differ), then
/// released for the daemons to bind.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

/// One node: its files, its addresses and, while it runs, its process.
#[derive(Debug)]
pub struct Node {
    name: String,
    primary: bool,
    address: SocketAddr,
    disk: PathBuf,
    mgmt_socket: PathBuf,
    nbd_socket: Option<PathBuf>,
    nbd_addr: Option<SocketAddr>,
    log: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    runs: u32,
    /// Whether a failure message already carried the log tail (Drop then skips it).
    log_shown: std::cell::Cell<bool>,
}

impl Node {
    /// The node's name in the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether its configured initial role is Primary.
    pub fn is_initial_primary(&self) -> bool {
        self.primary
    }

    /// Its replication listen address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its backing file.
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// Its management socket.
    pub fn mgmt_socket(&self) -> &Path {
        &self.mgmt_socket
    }

    /// Its log file (stdout + stderr of every run).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The config file it runs with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// `nbd+unix:///?socket=PATH`; panics if the node has no NBD socket.
    pub fn nbd_unix_uri(&self) -> String {
        let p = self
            .nbd_socket
            .as_ref()
            .unwrap_or_else(|| panic!("node {} has no nbd-socket", self.name));
        format!("nbd+unix:///?socket={}", p.display())
    }

    /// Its NBD Unix socket path, if configured.
    pub fn nbd_socket(&self) -> Option<&Path> {
        self.nbd_socket.as_deref()
    }

    /// Its NBD TCP address, if configured.
    pub fn nbd_addr(&self) -> Option<SocketAddr> {
        self.nbd_addr
    }

    /// `nbd://127.0.0.1:PORT/`; panics if the node has no NBD TCP address.
    pub fn nbd_tcp_uri(&self) -> String {
        let a = self
            .nbd_addr
            .unwrap_or_else(|| panic!("node {} has no nbd-listen", self.name));
        format!("nbd://{a}/")
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the node (`tandem up --config C --node NAME`) and waits until its
    /// management socket answers `status`; panics with its log if it exits or does not
    /// answer within [`START_TIMEOUT`].
    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Spawns the process without waiting for it.
    pub fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "node {} is already running",
            self.name
        );
        self.runs += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", self.log.display()));
        let _ = writeln!(
            log,
            "=== harness: start #{} of node {} ===",
            self.runs, self.name
        );
        let err = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(tandem_bin());
        cmd.arg("up")
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(&self.name)
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} up for node {}: {e}",
                tandem_bin().display(),
                self.name
            )
        });
        self.child = Some(child);
    }

    /// Waits until the management socket answers `status` (bounded by [`START_TIMEOUT`]).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + scaled(START_TIMEOUT);
        loop {
            self.assert_running("during start-up");
            let last_err = match mgmt::status(&self.mgmt_socket) {
                Ok(_) => return,
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "node {} did not answer status on {} within {:?} (last error: {last_err})\n{}",
                    self.name,
                    self.mgmt_socket.display(),
                    scaled(START_TIMEOUT),
                    self.log_report()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_)) | Err(_)) | None => false,
        }
    }

    /// Panics with the log tail if the node's process has exited; `context` says when.
    pub fn assert_running(&mut self, context: &str) {
        let Some(child) = self.child.as_mut() else {
            panic!("node {} is not running {context}", self.name);
        };
        match child.try_wait() {
            Ok(None) => {}
            Ok(Some(st)) => {
                self.child = None;
                panic!(
                    "node {} exited {context} with {st}\n{}",
                    self.name,
                    self.log_report()
                );
            }
            Err(e) => panic!("cannot check node {}: {e}", self.name),
        }
    }

    /// Sends SIGTERM and waits (bounded by [`STOP_TIMEOUT`]) for the exit; returns its
    /// status. Past the deadline the node is killed and this panics.
    pub fn stop_status(&mut self) -> ExitStatus {
        let Some(mut child) = self.child.take() else {
            panic!("node {} is not running", self.name);
        };
        if let Ok(Some(st)) = child.try_wait() {
            return st;
        }
        if let Err(e) = send_signal(child.id(), "TERM") {
            let _ = child.kill();
            let _ = child.wait();
            panic!("SIGTERM to node {}: {e}", self.name);
        }
        let deadline = Instant::now() + scaled(STOP_TIMEOUT);
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "node {} did not exit within {:?} of SIGTERM; killed\n{}",
                        self.name,
                        scaled(STOP_TIMEOUT),
                        self.log_report()
                    );
                }
            }
        }
    }

    /// Clean stop: SIGTERM, and the contract says the exit status is 0.
    pub fn stop(&mut self) {
        let st = self.stop_status();
        assert!(
            st.success(),
            "node {} exited with {st} after SIGTERM (expected 0)\n{}",
            self.name,
            self.log_report()
        );
    }

    /// kill -9: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Clean stop, then start again.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// The status object over the management socket.
    pub fn try_status(&self) -> anyhow::Result<Value> {
        mgmt::status(&self.mgmt_socket)
    }

    /// The status object; panics with the log tail if the node does not answer.
    pub fn status(&self) -> Value {
        self.try_status().unwrap_or_else(|e| {
            panic!("status of node {}: {e:#}\n{}", self.name, self.log_report())
        })
    }

    /// Polls status until `pred` holds (bounded by `timeout`, scaled); returns the status
    /// that satisfied it. On timeout panics with `what`, the last status and the log tail.
    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let mut last = String::from("(no answer yet)");
        let mut found = None;
        let ok = try_wait_until(timeout, || match self.try_status() {
            Ok(s) => {
                if pred(&s) {
                    found = Some(s);
                    true
                } else {
                    last = s.to_string();
                    false
                }
            }
            Err(e) => {
                last = format!("error: {e:#}");
                false
            }
        });
        match found {
            Some(s) if ok => s,
            _ => panic!(
                "timed out after {:?} waiting for node {}: {what}\nlast status: {last}\n{}",
                scaled(timeout),
                self.name,
                self.log_report()
            ),
        }
    }

    /// Waits until status shows `connection == "Connected"` (bounded by [`CONNECT_TIMEOUT`]).
    pub fn wait_connected(&self) -> Value {
        self.wait_status(CONNECT_TIMEOUT, "connection Connected", |s| {
            s.opt_str("/connection") == Some("Connected")
        })
    }

    /// Waits (bounded by [`START_TIMEOUT`]) until this node's NBD Unix socket completes an
    /// NBD handshake (`NBD_OPT_GO` on export ""), then disconnects politely with
    /// `NBD_CMD_DISC`. A socket file alone proves nothing: a killed daemon leaves its file.
    pub fn wait_nbd_ready(&self) {
        let Some(p) = self.nbd_socket.as_deref() else {
            return;
        };
        let mut last = String::from("(not tried)");
        let ok = try_wait_until(START_TIMEOUT, || match nbd_probe(p) {
            Ok(()) => true,
            Err(e) => {
                last = format!("{e:#}");
                false
            }
        });
        if !ok {
            panic!(
                "node {} does not serve NBD on {} (last error: {last})\n{}",
                self.name,
                p.display(),
                self.log_report()
            );
        }
    }

    /// Current length of the log, to search only what comes after (see [`Node::wait_refusal`]).
    pub fn log_len(&self) -> u64 {
        logs::log_len(&self.log)
    }

    /// Log text appended after `offset`.
    pub fn log_since(&self, offset: u64) -> String {
        logs::log_since(&self.log, offset)
    }

    /// The last `n` log lines.
    pub fn log_tail(&self, n: usize) -> String {
        logs::log_tail(&self.log, n)
    }

    /// Waits (bounded by [`LOG_TIMEOUT`]) for a line written after `offset` that explains a
    /// refusal (see [`logs::REFUSAL_WORDS`]); returns it. `what` names the attack.
    pub fn wait_refusal(&self, offset: u64, what: &str) -> String {
        let found = try_wait_until(LOG_TIMEOUT, || {
            logs::find_refusal(&self.log_since(offset)).is_some()
        });
        let text = self.log_since(offset);
        match logs::find_refusal(&text) {
            Some(line) if found => line.to_string(),
            _ => panic!(
                "node {} logged no refusal (a line with one of {:?}) within {:?} after {what}\n\
                 --- log since the attack ---\n{}",
                self.name,
                logs::REFUSAL_WORDS,
                scaled(LOG_TIMEOUT),
                crate::bin::tail_lines(&text, LOG_TAIL_LINES)
            ),
        }
    }

    /// A header plus the last [`LOG_TAIL_LINES`] log lines, for failure messages.
    pub fn log_report(&self) -> String {
        self.log_shown.set(true);
        format!(
            "--- log of node {} ({}), last {LOG_TAIL_LINES} lines ---\n{}\n--- end of log of {} \
             ---",
            self.name,
            self.log.display(),
            self.log_tail(LOG_TAIL_LINES),
            self.name
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() && self.runs > 0 && !self.log_shown.get() {
            eprintln!("{}", self.log_report());
        }
    }
}

/// Two nodes sharing one resource config, in their own temp dir.
#[derive(Debug)]
pub struct Cluster {
    // Field order is drop order: the processes die before their directory goes.
    nodes: Vec<Node>,
    config: PathBuf,
    config_text: String,
    opts: ClusterOpts,
    dir: TempDir,
}

impl Cluster {
    /// Builds the cluster and, if `opts.autostart`, starts both nodes (each answering
    /// status; not yet waiting for them to connect: see [`Cluster::wait_connected`]).
    pub fn new(opts: ClusterOpts) -> Cluster {
        // Resolve (and build) the binary first: a build failure is the clearest message.
        let _ = tandem_bin();
        let dir = TempDir::new(&opts.label);
        let ports = free_ports(4);
        let port = |i: usize| *ports.get(i).expect("four ports picked");
        let names = ["alpha", "beta"];
        let config = dir.join(format!("{}.toml", opts.resource));
        let nodes: Vec<Node> = names
            .iter()
            .enumerate()
            .map(|(i, name)| Node {
                name: (*name).to_string(),
                primary: i == 0,
                address: SocketAddr::from(([127, 0, 0, 1], port(i))),
                disk: dir.join(format!("{name}.img")),
                mgmt_socket: dir.join(format!("{name}.sock")),
                nbd_socket: opts.nbd_unix.then(|| dir.join(format!("{name}.nbd"))),
                nbd_addr: opts
                    .nbd_tcp
                    .then(|| SocketAddr::from(([127, 0, 0, 1], port(2 + i)))),
                log: dir.join(format!("{name}.log")),
                config: config.clone(),
                child: None,
                runs: 0,
                log_shown: std::cell::Cell::new(false),
            })
            .collect();
        let config_text = render_config(&opts, &nodes);
        std::fs::write(&config, &config_text)
            .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let mut c = Cluster {
            nodes,
            config,
            config_text,
            opts,
            dir,
        };
        if c.opts.autostart {
            c.start_all();
        }
        c
    }

    /// The temp dir (logs, images, sockets, config).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Keeps the temp dir after the test.
    pub fn keep_dir(&mut self) {
        self.dir.keep();
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The config as written.
    pub fn config_text(&self) -> &str {
        &self.config_text
    }

    /// The options it was built with.
    pub fn opts(&self) -> &ClusterOpts {
        &self.opts
    }

    /// All nodes (alpha, beta).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i` (0 = alpha, 1 = beta).
    pub fn node(&self, i: usize) -> &Node {
        self.nodes.get(i).expect("node index 0 or 1")
    }

    /// Node `i`, mutable.
    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        self.nodes.get_mut(i).expect("node index 0 or 1")
    }

    /// alpha, configured Primary.
    pub fn primary(&self) -> &Node {
        self.node(0)
    }

    /// alpha, mutable.
    pub fn primary_mut(&mut self) -> &mut Node {
        self.node_mut(0)
    }

    /// beta, configured Secondary.
    pub fn secondary(&self) -> &Node {
        self.node(1)
    }

    /// beta, mutable.
    pub fn secondary_mut(&mut self) -> &mut Node {
        self.node_mut(1)
    }

    /// Both replication ports.
    pub fn replication_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.address.port()).collect()
    }

    /// Spawns every node that is not running, then waits for each to answer status.
    pub fn start_all(&mut self) {
        for n in &mut self.nodes {
            if n.child.is_none() {
                n.spawn();
            }
        }
        for n in &mut self.nodes {
            n.wait_ready();
        }
    }

    /// Stops every running node with SIGTERM, asserting exit status 0. The Primary goes
    /// first: a clean stop of a Primary ends with its writes acknowledged by the peer (as
    /// DRBD's `down` does), and the idle Secondary then has everything to write out.
    pub fn stop_all(&mut self) {
        for n in self.nodes.iter_mut() {
            if n.child.is_some() {
                n.stop();
            }
        }
    }

    /// Waits until every running node reports `connection == "Connected"` and the node
    /// configured as Primary is Primary (it promotes itself once connected: the peer
    /// agrees first), then until the Primary's NBD export completes a handshake.
    pub fn wait_connected(&self) {
        for n in &self.nodes {
            if n.child.is_some() {
                n.wait_connected();
            }
        }
        for n in &self.nodes {
            if n.child.is_some() && n.primary {
                n.wait_status(CONNECT_TIMEOUT, "configured Primary promoted", |s| {
                    s.opt_str("/role") == Some("Primary")
                        || s.opt_str("/startup_role")
                            .is_some_and(|r| r.starts_with("not promoted"))
                });
            }
        }
        for n in &self.nodes {
            if n.child.is_some() && n.primary {
                n.wait_nbd_ready();
            }
        }
    }

    /// Compares the first `len` bytes (the exported size) of both backing files; panics
    /// with the first differing 4 KiB block. The nodes must be stopped.
    pub fn assert_replicas_identical(&mut self, len: u64) {
        for n in &mut self.nodes {
            assert!(
                !n.is_running(),
                "stop node {} before comparing backing files",
                n.name
            );
        }
        let (a, b) = (self.node(0).disk.clone(), self.node(1).disk.clone());
        crate::assert_same_content(&a, &b, Some(len));
    }
}

/// One clean NBD session on a Unix socket: handshake, then `NBD_CMD_DISC`.
fn nbd_probe(path: &Path) -> anyhow::Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(scaled(crate::nbd_raw::IO_TIMEOUT)))?;
    s.set_write_timeout(Some(scaled(crate::nbd_raw::IO_TIMEOUT)))?;
    crate::nbd_raw::handshake_go(&mut s, "")?;
    s.write_all(&crate::nbd_raw::request(crate::nbd_raw::CMD_DISC, 0, 0, 0))?;
    Ok(())
}

fn render_config(opts: &ClusterOpts, nodes: &[Node]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# written by the tandem-tests harness");
    let _ = writeln!(s, "[resource]");
    let _ = writeln!(s, "name = {}", toml_str(&opts.resource));
    let _ = writeln!(s, "protocol = {}", toml_str(opts.protocol.as_str()));
    let _ = writeln!(s, "size = {}", toml_str(&opts.size));
    if !opts.net.is_empty() {
        let _ = writeln!(s, "\n[net]");
        for (k, v) in &opts.net {
            let _ = writeln!(s, "{k} = {v}");
        }
    }
    if !opts.disk.is_empty() {
        let _ = writeln!(s, "\n[disk]");
        for (k, v) in &opts.disk {
            let _ = writeln!(s, "{k} = {v}");
        }
    }
    for n in nodes {
        let _ = writeln!(s, "\n[[node]]");
        let _ = writeln!(s, "name = {}", toml_str(&n.name));
        let _ = writeln!(s, "address = {}", toml_str(&n.address.to_string()));
        let _ = writeln!(s, "disk = {}", path_str(&n.disk));
        if opts.meta_external {
            let _ = writeln!(s, "meta-disk = {}", path_str(&n.disk.with_extension("md")));
        }
        let role = if n.primary { "primary" } else { "secondary" };
        let _ = writeln!(s, "role = {}", toml_str(role));
        if let Some(p) = &n.nbd_socket {
            let _ = writeln!(s, "nbd-socket = {}", path_str(p));
        }
        if let Some(a) = &n.nbd_addr {
            let _ = writeln!(s, "nbd-listen = {}", toml_str(&a.to_string()));
        }
        let _ = writeln!(s, "mgmt-socket = {}", path_str(&n.mgmt_socket));
    }
    s
}

/// Typed reads of a status object (`tandem status --json` / the `status` reply).
/// Paths are JSON pointers: `/connection`, `/peer/role`.
pub trait StatusExt {
    /// The string at `pointer`, if there is one.
    fn opt_str(&self, pointer: &str) -> Option<&str>;
    /// The unsigned integer at `pointer`, if there is one.
    fn opt_u64(&self, pointer: &str) -> Option<u64>;
    /// The string at `pointer`; panics naming the pointer and showing the object.
    fn str_at(&self, pointer: &str) -> &str;
    /// The unsigned integer at `pointer`; panics naming the pointer and showing the object.
    fn u64_at(&self, pointer: &str) -> u64;
}

impl StatusExt for Value {
    fn opt_str(&self, pointer: &str) -> Option<&str> {
        self.pointer(pointer).and_then(Value::as_str)
    }

    fn opt_u64(&self, pointer: &str) -> Option<u64> {
        self.pointer(pointer).and_then(Value::as_u64)
    }

    fn str_at(&self, pointer: &str) -> &str {
        self.opt_str(pointer)
            .unwrap_or_else(|| panic!("status has no string at {pointer}: {self}"))
    }

    fn u64_at(&self, pointer: &str) -> u64 {
        self.opt_u64(pointer)
            .unwrap_or_else(|| panic!("status has no unsigned integer at {pointer}: {self}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct() {
        let p = free_ports(4);
        let mut q = p.clone();
        q.sort_unstable();
        q.dedup();
        assert_eq!(q.len(), 4);
        assert!(p.iter().all(|&x| x != 0));
    }

    #[test]
    fn config_has_the_contract_keys() {
        let dir = TempDir::new("cfg");
        let opts = ClusterOpts::new("cfg").nbd_tcp(true).protocol(Protocol::B);
        let node = |name: &str, primary: bool, port: u16| Node {
            name: name.into(),
            primary,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            disk: dir.join(format!("{name}.img")),
            mgmt_socket: dir.join(format!("{name}.sock")),
            nbd_socket: Some(dir.join(format!("{name}.nbd"))),
            nbd_addr: Some(SocketAddr::from(([127, 0, 0, 1], port + 10))),
            log: dir.join(format!("{name}.log")),
            config: dir.join("r0.toml"),
            child: None,
            runs: 0,
            log_shown: std::cell::Cell::new(false),
        };
        let nodes = vec![node("alpha", true, 7789), node("beta", false, 7790)];
        let text = render_config(&opts, &nodes);
        for want in [
            "[resource]",
            "name = \"r0\"",
            "protocol = \"B\"",
            "size = \"64MiB\"",
            "[net]",
            "connect-int = 1",
            "[[node]]",
            "name = \"alpha\"",
            "address = \"127.0.0.1:7789\"",
            "role = \"primary\"",
            "role = \"secondary\"",
            "nbd-listen = \"127.0.0.1:7799\"",
            "mgmt-socket = ",
            "nbd-socket = ",
            "disk = ",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn status_ext() {
        let v: Value = serde_json::from_str(
            r#"{"connection":"Connected","peer":{"role":"Secondary"},"size_bytes":4096}"#,
        )
        .expect("json");
        assert_eq!(v.str_at("/connection"), "Connected");
        assert_eq!(v.str_at("/peer/role"), "Secondary");
        assert_eq!(v.u64_at("/size_bytes"), 4096);
        assert_eq!(v.opt_str("/peer/disk"), None);
        let null_peer: Value = serde_json::from_str(r#"{"peer":null}"#).expect("json");
        assert_eq!(null_peer.opt_str("/peer/role"), None);
    }
}
