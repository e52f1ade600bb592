//! The daemon: wires one resource's pieces together and runs them until SIGTERM.
//!
//! `tandem up` loads and validates the config, takes the node's lock file
//! (`<mgmt-socket>.lock`, [`lock_node`]: a second process of the same node stops there,
//! naming the running pid), opens and locks the backing device, attaches its
//! DRBD 9 metadata ([`attach_disk`]: apply the activity log after a crash, mark the
//! metadata unclean, load the bitmap — before any IO is served), starts the
//! volume driver (`crate::volume`), the replication connection ([`crate::net`]), the NBD
//! exports ([`crate::frontend::nbd`]) and the management socket ([`crate::mgmt`]) on one
//! current-thread tokio runtime (see `runtime` for the measurement; the backing
//! device's io_uring completions arrive through that runtime's epoll), then waits for
//! SIGTERM/SIGINT. Shutdown stops the frontends (requests in flight finish), sends a
//! final flush through the replication core so a connected peer has every write on its
//! disk, then closes the connection, flushes the backing device and exits 0; each step is
//! bounded by [`SHUTDOWN_GRACE`].
//! `tandem demo` runs two such nodes as child processes on loopback.
//!
//! CLI output goes through [`out_line`]: a reader that closed the pipe (EPIPE) ends the
//! command with exit status 0 ([`StdoutClosed`]) instead of a panic; the log writer drops
//! lines it cannot write.

use crate::config::{Config, InitialRole, MetaDisk, NodeConfig};
use crate::frontend::nbd::{DataBudget, NbdListener, NbdOptions};
use crate::frontend::{BlockIo, BlockRequest, BlockTarget};
use crate::meta::al::AlGeometry;
use crate::meta::disk::{Attach, CreateOptions, MetaDevice, MetaLocation};
use crate::meta::layout::{bitmap_bytes, MIN_META_BYTES};
use crate::mgmt;
use crate::store::{DeviceLock, LockError, Store, StoreOptions};
use crate::volume::Volume;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What a daemon process sets up before anything else: logging, the crash-stop on a
/// bug, the allocator's tuning.
fn init_process() {
    init_logging();
    crash_on_panic();
    crate::store::tune_allocator();
}

/// Makes every panic of the daemon stop the process (SIGABRT) after logging it.
///
/// Inputs (packets, NBD requests, commands, metadata) are checked and answered with
/// errors, never asserted; so a panic is a bug on this node — a broken contract between
/// the driver and a core, an invariant that does not hold. Without this hook tokio would
/// catch it in the task, and the node would go on serving from a state that no longer
/// describes its disk. Stopping is safe: the activity log and the bitmap make the
/// restart resync whatever may differ, and nothing unacknowledged was promised.
fn crash_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!("BUG: {info}; stopping the daemon");
        default(info);
        std::process::abort();
    }));
}

/// How long shutdown waits for in-flight requests and the final flush.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Timeout of a CLI call to the management socket.
pub(crate) const CLI_TIMEOUT: Duration = Duration::from_secs(10);

/// The log's writer: standard error, where a write that fails (a closed pipe, a full
/// disk) drops the line instead of failing. tracing-subscriber reports a failed write with
/// `eprintln!`, which panics when standard error itself is the closed pipe.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// A CLI command's standard output was closed by its reader (`tandem status | head -1`,
/// EPIPE): the command stops quietly and exits 0, as a filter whose reader is done.
#[derive(Debug, thiserror::Error)]
#[error("standard output closed by its reader")]
pub struct StdoutClosed;

/// Writes one line to standard output. A closed pipe gives [`StdoutClosed`]; another
/// write error (a full disk) an error that says so. Never panics, unlike `println!`.
pub fn out_line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let written = o
        .write_fmt(args)
        .and_then(|()| o.write_all(b"\n"))
        .and_then(|()| o.flush());
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::anyhow!("cannot write to standard output: {e}")),
    }
}

/// `println!` for CLI commands: returns from the function on a closed stdout.
macro_rules! outln {
    () => { out_line(format_args!(""))? };
    ($($t:tt)*) => { out_line(format_args!($($t)*))? };
}

/// `println!` for the demo's banner: a closed stdout is ignored (the demo must still stop
/// its nodes on Ctrl-C).
macro_rules! sayln {
    () => { let _ = out_line(format_args!("")); };
    ($($t:tt)*) => { let _ = out_line(format_args!($($t)*)); };
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| QuietStderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// The node's runtime: one thread by default. Measured on the 2-vCPU test VM (fio over
/// NBD, 4K, peer disconnected, interleaved runs): the current-thread runtime gave QD32
/// 34k vs 26k IOPS (randread) and QD1 clat p50 ~121 vs ~144 µs against 2 workers, because
/// the NBD reader, the request and the store completion then run on one thread with no
/// cross-thread wake-ups or work stealing. `TANDEM_RT_WORKERS=N` (N ≥ 2) selects a
/// multi-thread runtime with N workers for machines where one core is not enough.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("TANDEM_RT_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    if workers <= 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.min(64))
        .thread_name("tandem-rt")
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// `tandem up`: runs one node in the foreground until SIGTERM/SIGINT.
pub fn run_node(config_path: &Path, node: Option<&str>) -> anyhow::Result<()> {
    init_process();
    let config = Config::load(config_path)?;
    let me_name = match node {
        Some(n) => n.to_string(),
        None => pick_local_node(&config)?,
    };
    let (me, peer) = config.split(&me_name)?;
    let (me, peer) = (me.clone(), peer.clone());
    // Held until the process exits: one process per node and per device.
    let mut locks = vec![lock_node(&config, &me)?];
    let (store, md, attach) = attach_disk(&config, &me, &mut locks)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let volume = Volume::new(&config, &me, &peer, store, md, attach)?;
        let mut tasks = tokio::task::JoinSet::new();
        if me.role == InitialRole::Primary {
            let v = volume.clone();
            let wfc = config.startup.wfc_timeout;
            tokio::spawn(async move { v.become_primary_at_start(wfc).await });
        }

        let listener = mgmt::bind(&me.mgmt_socket).with_context(|| {
            format!("cannot bind management socket {}", me.mgmt_socket.display())
        })?;
        tasks.spawn(mgmt::serve(
            listener,
            me.mgmt_socket.clone(),
            volume.clone(),
            shutdown_rx.clone(),
        ));

        // One budget of NBD data in flight for both listeners.
        let nbd_budget =
            DataBudget::new(usize::try_from(config.nbd.data_budget).unwrap_or(usize::MAX));
        if let Some(path) = &me.nbd_socket {
            let l = NbdListener::bind_unix(path)
                .with_context(|| format!("cannot bind NBD socket {}", path.display()))?;
            tasks.spawn(serve_nbd(
                l,
                volume.clone(),
                nbd_options(&config, &nbd_budget),
                shutdown_rx.clone(),
            ));
        }
        if let Some(addr) = me.nbd_listen {
            let l = NbdListener::bind_tcp(addr)
                .await
                .with_context(|| format!("cannot listen for NBD on {addr}"))?;
            tasks.spawn(serve_nbd(
                l,
                volume.clone(),
                nbd_options(&config, &nbd_budget),
                shutdown_rx.clone(),
            ));
        }
        // The connection stops last, on its own signal: see the shutdown below.
        let (net_stop_tx, net_stop_rx) = tokio::sync::watch::channel(false);
        let net_task = tokio::spawn(crate::net::run(
            volume.clone(),
            config.clone(),
            me.clone(),
            peer.clone(),
            net_stop_rx,
        ));

        tracing::info!(
            "node {} of resource {} up: disk {} ({} bytes), replication on {}, peer {} at {}",
            me.name,
            config.resource.name,
            me.disk.display(),
            volume.size_bytes(),
            me.address,
            peer.name,
            peer.address
        );
        wait_for_signal().await;
        stop_node(&volume, tasks, &shutdown_tx, &net_stop_tx, net_task).await;
        tracing::info!("stopped cleanly");
        drop(locks);
        anyhow::Ok(())
    })
}

/// The clean stop, in order: frontends and management, a final flush through the
/// replication core, the connection, then the volume (each step bounded by
/// [`SHUTDOWN_GRACE`]).
async fn stop_node(
    volume: &Arc<Volume>,
    mut tasks: tokio::task::JoinSet<()>,
    shutdown_tx: &tokio::sync::watch::Sender<bool>,
    net_stop_tx: &tokio::sync::watch::Sender<bool>,
    net_task: tokio::task::JoinHandle<()>,
) {
    tracing::info!("shutting down");
    // 1. Frontends and management stop; requests in flight finish.
    let _ = shutdown_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("frontends did not stop within {SHUTDOWN_GRACE:?}; going on");
    }
    // 2. A final flush through the replication core: it closes the last epoch and,
    //    while connected, completes only when the peer has acked every epoch after
    //    flushing its disk. Without it a protocol A (or B) Primary would drop the
    //    connection with writes the peer has not yet applied, leaving it behind.
    match tokio::time::timeout(
        SHUTDOWN_GRACE,
        volume.submit(BlockRequest::new(0, BlockIo::Flush)),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("final flush failed: {e}"),
        Err(_) => {
            tracing::warn!("the peer did not ack the final flush within {SHUTDOWN_GRACE:?}")
        }
    }
    // 3. Then the connection.
    let _ = net_stop_tx.send(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, net_task)
        .await
        .is_err()
    {
        tracing::warn!("the connection did not stop within {SHUTDOWN_GRACE:?}");
    }
    volume.shutdown(SHUTDOWN_GRACE).await;
}

/// The lock file of a node: its management socket's path with `.lock` appended.
pub(crate) fn node_lock_path(me: &NodeConfig) -> PathBuf {
    let mut p = me.mgmt_socket.clone().into_os_string();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes the node's lock file (see [`node_lock_path`]) and writes this process's pid into
/// it: a second `tandem up` of the same node fails here, naming the running one, before
/// it reads or writes anything else.
pub(crate) fn lock_node(config: &Config, me: &NodeConfig) -> anyhow::Result<DeviceLock> {
    use std::io::Write as _;
    let path = node_lock_path(me);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory of {}", path.display()))?;
    }
    let lock = match DeviceLock::acquire(&path, true) {
        Ok(l) => l,
        Err(e @ LockError::Held { .. }) => {
            // /proc/locks names the holder; the pid it wrote is the fallback.
            let pid = e.holder().or_else(|| {
                std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
            });
            bail!(
                "node {} of resource {} is already running{} (it holds {}): stop it first, \
                 or query it with `tandem status --socket {}`; this process changed nothing",
                me.name,
                config.resource.name,
                pid.map_or_else(String::new, |p| format!(" as process {p}")),
                path.display(),
                me.mgmt_socket.display()
            );
        }
        Err(e) => return Err(e).context(format!("node {}: cannot take its lock file", me.name)),
    };
    let mut f = lock.file();
    let written = f
        .set_len(0)
        .and_then(|()| writeln!(f, "{}", std::process::id()));
    if let Err(e) = written {
        tracing::warn!("cannot write the pid into {}: {e}", path.display());
    }
    Ok(lock)
}

/// Locks one of the node's devices (see [`DeviceLock`]); `what` is "disk" or "meta-disk".
fn lock_device(me: &NodeConfig, path: &Path, what: &str) -> anyhow::Result<DeviceLock> {
    DeviceLock::acquire(path, false).map_err(|e| match e {
        LockError::Held { .. } => anyhow::anyhow!(
            "node {}: {what} {e} (another tandem using the same {what}, or a `tandem` \
             metadata command): stop it first; this process changed nothing",
            me.name
        ),
        other => anyhow::anyhow!("node {}: {what}: {other}", me.name),
    })
}

/// Opens the node's disk and attaches its metadata (see [`MetaDevice::attach_blocking`]).
/// A backing file (and a flex-external metadata file) that this call creates from
/// `resource.size` gets fresh metadata, as `tandem create-md` would write it, marked
/// consistent (the file is all zeroes); an existing device without metadata is refused
/// with the `create-md` command to run. Metadata made by `create-md` is Inconsistent
/// until a resync, `primary --force` or `new-current-uuid --clear-bitmap`.
/// Each device is locked ([`DeviceLock`], pushed to `locks`) right after it is opened and
/// before any metadata is read or written.
pub(crate) fn attach_disk(
    config: &Config,
    me: &NodeConfig,
    locks: &mut Vec<DeviceLock>,
) -> anyhow::Result<(Store, MetaDevice, Attach)> {
    let fresh = !me.disk.exists();
    let open = |path: &Path, size: Option<u64>| {
        Store::open(
            path,
            &StoreOptions {
                create_size_bytes: size,
                ..StoreOptions::default()
            },
        )
        .with_context(|| format!("node {}: cannot open {}", me.name, path.display()))
    };
    let store = open(&me.disk, config.resource.size_bytes)?;
    locks.push(lock_device(me, &me.disk, "disk")?);
    let node_id = config
        .nodes
        .iter()
        .position(|n| n.name == me.name)
        .and_then(|i| i32::try_from(i).ok())
        .unwrap_or(-1);
    let create = CreateOptions {
        node_id,
        al_extents: config.disk.al_extents,
        ..CreateOptions::new(AlGeometry::default_ring())
    };
    let (meta_store, location, fresh_md) = match &me.meta_disk {
        MetaDisk::Internal => (store.clone(), MetaLocation::Internal, fresh),
        MetaDisk::External(path) => {
            let data_bytes = store.size_bytes();
            let fresh_md = !path.exists();
            // Superblock + ring + the bitmap of the whole data device, at least 1 MiB.
            let need = bitmap_bytes(data_bytes / 512)
                .map(|b| (4096 + AlGeometry::default_ring().bytes() + b).max(MIN_META_BYTES));
            let meta = open(path, if fresh_md { need } else { None })?;
            locks.push(lock_device(me, path, "meta-disk")?);
            (meta, MetaLocation::FlexExternal { data_bytes }, fresh_md)
        }
    };
    let mut md = if fresh_md {
        tracing::info!("creating metadata on {}", meta_store.info().path.display());
        let mut md = MetaDevice::create(meta_store, location, &create)?;
        if fresh {
            // A data file created just now reads as zeroes: consistent, and equal to a
            // peer's that was created the same way (both UUIDs just-created: no initial
            // sync). A peer with data of its own still makes this one its full-sync
            // target, by the UUIDs.
            md.set_consistent_blocking(true)?;
        }
        md
    } else {
        MetaDevice::open(meta_store, location)?
    };
    let data_sectors = match location {
        MetaLocation::Internal => md.layout().max_data_sectors,
        MetaLocation::FlexExternal { data_bytes } => {
            (data_bytes / 512).min(md.layout().max_data_sectors)
        }
    };
    let attach = md.attach_blocking(data_sectors, config.disk.al_extents)?;
    if let Some(r) = &attach.apply {
        tracing::warn!(
            "{} was not stopped cleanly{}: activity log applied ({} hot extents, {} bits newly \
             set)",
            me.disk.display(),
            if attach.crashed_primary() {
                " while Primary"
            } else {
                ""
            },
            r.hot_extents.len(),
            r.bits_newly_set
        );
    }
    Ok((store, md, attach))
}

fn nbd_options(config: &Config, budget: &Arc<DataBudget>) -> NbdOptions {
    NbdOptions {
        export_name: config.resource.name.clone(),
        idle_timeout: config.nbd.idle_timeout,
        data_budget: Arc::clone(budget),
        ..Default::default()
    }
}

async fn serve_nbd(
    l: NbdListener,
    volume: Arc<Volume>,
    opts: NbdOptions,
    rx: tokio::sync::watch::Receiver<bool>,
) {
    if let Err(e) = l.serve(volume, opts, rx).await {
        tracing::error!("NBD server stopped: {e}");
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Without `--node`: the node whose replication address is assigned to this host.
fn pick_local_node(config: &Config) -> anyhow::Result<String> {
    let local: Vec<_> = config
        .nodes
        .iter()
        .filter(|n| std::net::TcpListener::bind((n.address.ip(), 0)).is_ok())
        .collect();
    match local.as_slice() {
        [one] => Ok(one.name.clone()),
        _ => bail!(
            "cannot tell which node this is (both or neither address is local); pass --node NAME"
        ),
    }
}

fn socket_from(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    node: Option<&str>,
) -> anyhow::Result<PathBuf> {
    match (socket, config, node) {
        (Some(s), _, _) => Ok(s),
        (None, Some(c), Some(n)) => {
            let cfg = Config::load(&c)?;
            Ok(cfg.split(n)?.0.mgmt_socket.clone())
        }
        _ => bail!("give --socket PATH, or --config FILE --node NAME"),
    }
}

fn call(socket: &Path, req: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = rt.block_on(mgmt::call(socket, req, CLI_TIMEOUT))?;
    if reply["ok"] != true {
        bail!(
            "{}",
            reply["error"]
                .as_str()
                .unwrap_or("the node refused the command")
        );
    }
    Ok(reply)
}

/// `tandem status`.
pub fn cli_status(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    node: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let socket = socket_from(socket, config, node)?;
    let reply = call(&socket, &mgmt::Request::Status.canonical())?;
    let s = &reply["status"];
    if json {
        outln!("{s}");
        return Ok(());
    }
    let str_of = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    outln!("{} role:{}", str_of(&s["resource"]), str_of(&s["role"]));
    outln!(
        "  disk:{} size:{} protocol:{}",
        str_of(&s["disk"]),
        s["size_bytes"],
        str_of(&s["protocol"])
    );
    outln!(
        "  in-flight-writes:{} bytes-replicated:{} out-of-sync:{}",
        s["in_flight_writes"],
        s["bytes_replicated"],
        s["out_of_sync_bytes"]
    );
    let peer = &s["peer"];
    if peer.is_null() {
        outln!("  peer connection:{}", str_of(&s["connection"]));
    } else {
        outln!(
            "  {} connection:{} role:{} disk:{}",
            str_of(&peer["node"]),
            str_of(&s["connection"]),
            str_of(&peer["role"]),
            str_of(&peer["disk"])
        );
    }
    if let Some(why) = s["connection_error"].as_str() {
        println!("  last connection error: {why}");
    }
    Ok(())
}

/// `tandem primary|secondary|connect|disconnect`.
pub fn cli_command(socket: &Path, req: &mgmt::Request) -> anyhow::Result<()> {
    call(socket, &req.canonical()).map(|_| ())
}

/// `tandem events`: prints the recorded events, one JSON object per line; with
/// `follow`, keeps polling (every 500 ms) and prints new ones until interrupted or until
/// a line cannot be written (the reader of a pipe went away: exit 0, see [`StdoutClosed`]).
pub fn cli_events(socket: &Path, follow: bool) -> anyhow::Result<()> {
    let mut next = 0u64;
    loop {
        let reply = call(socket, &mgmt::Request::Events.canonical())?;
        for e in reply["events"].as_array().into_iter().flatten() {
            let seq = e["seq"].as_u64().unwrap_or(0);
            if seq >= next {
                outln!("{e}");
                next = seq + 1;
            }
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Longest `tandem verify` waits for the result.
const VERIFY_WAIT: Duration = Duration::from_secs(24 * 3600);

/// `tandem verify`: starts online verify, waits for its end, prints the differing
/// ranges (sector, length in sectors). Returns the number of blocks out of sync.
pub fn cli_verify(socket: &Path, json: bool) -> anyhow::Result<u64> {
    call(socket, &mgmt::Request::Verify.canonical())?;
    let started = std::time::Instant::now();
    let result = loop {
        std::thread::sleep(Duration::from_millis(200));
        let st = call(socket, &mgmt::Request::Status.canonical())?;
        let st = &st["status"];
        if st["verify"].is_null() {
            break st["last_verify"].clone();
        }
        if started.elapsed() > VERIFY_WAIT {
            bail!("verify did not finish within {} s", VERIFY_WAIT.as_secs());
        }
    };
    let oos = result["out_of_sync_blocks"].as_u64().unwrap_or(0);
    if json {
        outln!("{result}");
    } else {
        if result["finished"] != true {
            bail!("verify was interrupted (the connection dropped): {result}");
        }
        outln!(
            "verified {} blocks: {} out of sync",
            result["total_blocks"],
            oos
        );
        for r in result["ranges"].as_array().into_iter().flatten() {
            outln!("  out of sync: sector {} + {} sectors", r[0], r[1]);
        }
        if result["ranges_truncated"] == true {
            outln!("  (more ranges than listed)");
        }
    }
    Ok(oos)
}

/// `tandem demo`: two nodes as child processes, NBD on the Primary, until Ctrl-C.
pub fn run_demo(dir: &Path, size: &str, protocol: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config_path = dir.join("demo.toml");
    let text = Config::demo_text(dir, size, protocol);
    let config = Config::parse(&text, "demo config")?;
    std::fs::write(&config_path, &text)?;
    let exe = std::env::current_exe().context("cannot find my own binary")?;
    let mut children = Vec::new();
    for node in &config.nodes {
        let log = std::fs::File::create(dir.join(format!("{}.log", node.name)))?;
        let child = std::process::Command::new(&exe)
            .args(["up", "--config"])
            .arg(&config_path)
            .args(["--node", &node.name])
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start node {}", node.name))?;
        children.push(child);
    }
    let primary = &config.nodes[0];
    let mut connected = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        for (child, node) in children.iter_mut().zip(&config.nodes) {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join(format!("{}.log", node.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                for other in &mut children {
                    let _ = other.kill();
                }
                bail!(
                    "node {} exited ({status}) during start-up; its log ends:\n{}",
                    node.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        if call(&primary.mgmt_socket, &mgmt::Request::Status.canonical())
            .is_ok_and(|r| r["status"]["connection"] == "Connected")
        {
            connected = true;
            break;
        }
    }
    let nbd = primary
        .nbd_socket
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    sayln!(
        "tandem demo: resource \"demo\", {size}, protocol {protocol}, files and logs in {}",
        dir.display()
    );
    sayln!(
        "  alpha (Primary)   disk {}/alpha.img  mgmt {}",
        dir.display(),
        primary.mgmt_socket.display()
    );
    sayln!(
        "  beta  (Secondary) disk {}/beta.img   mgmt {}",
        dir.display(),
        config.nodes[1].mgmt_socket.display()
    );
    sayln!(
        "  replication: {}",
        if connected {
            "Connected"
        } else {
            "not connected yet (see the logs)"
        }
    );
    sayln!();
    sayln!("Point a client at the Primary's NBD export:");
    sayln!(
        "  fio --name=w --ioengine=nbd --uri='nbd+unix:///demo?socket={nbd}' --rw=randwrite \
         --bs=4k --iodepth=32 --size=256M --runtime=10 --time_based"
    );
    sayln!(
        "  qemu-system-x86_64 ... -drive \
         file=nbd+unix:///demo?socket={nbd},format=raw,if=virtio,cache=none"
    );
    sayln!("  nbdinfo 'nbd://127.0.0.1:10809/demo'");
    sayln!(
        "  {} status --socket {}",
        exe.display(),
        primary.mgmt_socket.display()
    );
    sayln!("Ctrl-C stops both nodes.");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(wait_for_signal());
    for child in &mut children {
        if let Ok(pid) = i32::try_from(child.id()) {
            // Ask the child to stop cleanly (SIGTERM), as systemd would.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    for child in &mut children {
        let _ = child.wait();
    }
    sayln!("tandem demo stopped; the replicas are in {}", dir.display());
    Ok(())
}

impl mgmt::Handler for Volume {
    fn open_writers(&self) -> usize {
        BlockTarget::openers(self).map_or(0, |o| o.count())
    }

    fn handle(&self, req: mgmt::Request) -> mgmt::Reply<'_> {
        Box::pin(async move {
            let done = |r: Result<(), String>| r.map(|()| serde_json::json!({}));
            match req {
                mgmt::Request::Primary { force } => done(self.promote(force).await),
                mgmt::Request::Secondary { force } => done(self.demote(force).await),
                mgmt::Request::Invalidate => done(self.invalidate().await),
                mgmt::Request::NewCurrentUuid { clear_bitmap } => {
                    done(self.new_current_uuid(clear_bitmap).await)
                }
                req => self.handle_now(req),
            }
        })
    }
}

impl Volume {
    /// The management requests that need no wait.
    fn handle_now(&self, req: mgmt::Request) -> Result<serde_json::Value, String> {
        match req {
            mgmt::Request::Status => Ok(serde_json::json!({ "status": self.status() })),
            mgmt::Request::Primary { .. }
            | mgmt::Request::Secondary { .. }
            | mgmt::Request::Invalidate
            | mgmt::Request::NewCurrentUuid { .. } => Err("handled above (they wait)".into()),
            mgmt::Request::Disconnect => {
                self.set_standalone(true);
                Ok(serde_json::json!({}))
            }
            // A Diskless Primary serves through its peer: it may connect again.
            mgmt::Request::Connect { .. } if self.disk_failed() => Err(
                "the disk failed and is detached; fix it and restart the node to attach it again"
                    .into(),
            ),
            mgmt::Request::Connect { discard_my_data } => {
                self.set_discard_my_data(discard_my_data);
                self.set_standalone(false);
                Ok(serde_json::json!({}))
            }
            mgmt::Request::PauseSync => {
                self.set_sync_paused(true);
                Ok(serde_json::json!({}))
            }
            mgmt::Request::ResumeSync => {
                self.set_sync_paused(false);
                Ok(serde_json::json!({}))
            }
            mgmt::Request::Verify => self.start_verify().map(|()| serde_json::json!({})),
            mgmt::Request::Events => Ok(serde_json::json!({ "events": self.events(0) })),
        }
    }
}
