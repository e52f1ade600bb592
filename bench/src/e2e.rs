//! The end-to-end runner: in one run on one machine, the limits (backing file through fio
//! io_uring direct, loopback TCP round trip and bandwidth), the peer (nbdkit's file plugin)
//! and tandem (peer disconnected, protocol C, protocol A), all driven by fio 3.33 with the
//! same jobs, then the activity log's cost and the resync section (`resync.rs`: a full
//! resync against the loopback limit, crash resync against full resync on 8 GiB, and
//! application IO during a full resync), then one [`Report`].
//!
//! Setup (docs/design.md §11): the Primary's backing is a file in the work dir (on the machine's
//! disk); the Secondary's is a loop device over a file on a tmpfs this runner mounts, so
//! the two replicas do not share one disk. Every target is filled once (1 MiB sequential
//! writes over the whole volume) before its first measured job.
//!
//! Cleanup: [`Setup`]'s `Drop` kills the daemons, detaches the loop device and unmounts the
//! tmpfs on every return path and on panic. A run killed by a signal leaves them; the next
//! run in the same work dir detaches and unmounts them first ([`Setup::new`]).
//!
//! Bounds: every wait has a deadline (daemon start [`START_TIMEOUT`], connect
//! [`CONNECT_TIMEOUT`], one fio run its runtime + [`FIO_SLACK`], one resync
//! `resync::deadline`); the default full run is about 10 minutes on 2 cores, `--quick`
//! about 1.

mod resync;

use crate::fio::{self, Engine};
use crate::report::{self, AlCost, Job, JobResult, Limits, Meta, Report, Target};
use anyhow::{anyhow, bail, Context};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a daemon may take to answer on its socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long two tandem nodes may take to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a fio run may take beyond its runtime (start, fill of a large volume) before it is
/// killed and the run fails.
pub const FIO_SLACK: Duration = Duration::from_secs(300);
/// Round trips the TCP probe measures at most.
const RTT_MAX_SAMPLES: usize = 200_000;
/// Size of the ack the TCP probe returns for each 4 KiB message (a DRBD `P_WRITE_ACK` with
/// its h95 header is 32 bytes).
const ACK_LEN: usize = 32;

/// Room for tandem's internal metadata (superblock, 32 KiB activity log, bitmap: 72 KiB
/// for 1 GiB) at the end of each tandem backing device, so the exported data area still
/// covers the benchmark's volume size.
pub const MD_ROOM: u64 = 4 << 20;
/// The activity-log cost runs with `al-extents` 67 (DRBD's minimum: 268 MiB of reach) over
/// a working set inside it (64 extents) and one 8 × its reach.
const AL_SMALL: u32 = 67;
const AL_INSIDE: u64 = 64 * (4 << 20);
const AL_OUTSIDE: u64 = 8 * AL_SMALL as u64 * (4 << 20);
/// Options of one run.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "e2e",
    about = "tandem side by side with its limits and nbdkit, one run"
)]
pub struct Opts {
    /// Short run (< 2 minutes): 256 MiB volumes (1 GiB for the resync section), 3 s per
    /// job.
    #[arg(long)]
    pub quick: bool,
    /// Volume size per target, e.g. 1GiB (default 1GiB, 256MiB with --quick).
    #[arg(long)]
    pub size: Option<String>,
    /// Seconds per fio job (default 15, 3 with --quick).
    #[arg(long)]
    pub runtime: Option<f64>,
    /// Seconds for each TCP probe (default 3, 1 with --quick).
    #[arg(long)]
    pub probe_time: Option<u32>,
    /// Work dir for backing files, sockets and logs (its tmpfs and loop device are removed
    /// at the end).
    #[arg(long, default_value = "/var/tmp/tandem-bench")]
    pub work_dir: PathBuf,
    /// Where the .md/.json/.svg results go.
    #[arg(long, default_value_os_t = default_results_dir())]
    pub out_dir: PathBuf,
    /// The tandem binary (default: build it with cargo into this runner's target dir).
    #[arg(long)]
    pub tandem: Option<PathBuf>,
    /// Do not apt-get install missing tools; fail instead.
    #[arg(long)]
    pub no_install: bool,
    /// Measure nothing: re-render the .md and .svg of a saved results .json (after a
    /// change to the report's layout).
    #[arg(long, value_name = "JSON")]
    pub render: Option<PathBuf>,
}

fn default_results_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("results")
}

impl Opts {
    fn size_bytes(&self) -> anyhow::Result<u64> {
        match &self.size {
            Some(s) => parse_size(s).ok_or_else(|| anyhow!("--size {s:?}: write e.g. 256MiB")),
            None if self.quick => Ok(256 << 20),
            None => Ok(1 << 30),
        }
    }
    fn runtime_s(&self) -> f64 {
        self.runtime
            .unwrap_or(if self.quick { 3.0 } else { 15.0 })
            .clamp(0.5, 3600.0)
    }
    fn probe_s(&self) -> u32 {
        self.probe_time
            .unwrap_or(if self.quick { 1 } else { 3 })
            .clamp(1, 600)
    }
}

/// `"256MiB"`, `"1GiB"`, `"4096"` → bytes (a multiple of 1 MiB is required by the fill).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return None,
    };
    let v = n.checked_mul(mult)?;
    (v >= 1 << 20 && v % (1 << 20) == 0).then_some(v)
}

/// What the run needs on PATH, with the Debian package that provides it.
const TOOLS: &[(&str, &str)] = &[("fio", "fio"), ("nbdkit", "nbdkit"), ("iperf3", "iperf3")];

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Installs missing tools with apt-get (unless `no_install`), then fails clearly if any
/// is still missing or fio lacks its nbd engine.
pub fn ensure_tools(no_install: bool) -> anyhow::Result<()> {
    let missing: Vec<&(&str, &str)> = TOOLS.iter().filter(|(p, _)| which(p).is_none()).collect();
    if !missing.is_empty() && !no_install {
        let pkgs: Vec<&str> = missing.iter().map(|(_, pkg)| *pkg).collect();
        eprintln!("e2e: installing {} with apt-get", pkgs.join(" "));
        let ok = Command::new("apt-get")
            .args(["update", "-q"])
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("e2e: apt-get install {} failed", pkgs.join(" "));
        }
    }
    let still: Vec<String> = TOOLS
        .iter()
        .filter(|(p, _)| which(p).is_none())
        .map(|(p, pkg)| format!("`{p}` (Debian package {pkg})"))
        .collect();
    if !still.is_empty() {
        bail!(
            "missing tools: {}; install them (apt-get install ...) or run without --no-install as \
             root",
            still.join(", ")
        );
    }
    let eng = run_capture(Command::new("fio").arg("--enghelp"))?;
    if !eng.lines().any(|l| l.trim() == "nbd") {
        bail!(
            "this fio has no `nbd` engine (Debian's fio 3.33 has it): `fio --enghelp` lists \
             {eng:?}"
        );
    }
    Ok(())
}

fn run_capture(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Everything a run creates outside its work dir files, torn down in `Drop`: processes
/// first (they hold the loop device), then the loop device, then the tmpfs mount.
#[derive(Debug)]
pub struct Setup {
    work: PathBuf,
    children: Vec<(String, Child)>,
    loop_dev: Option<String>,
    mount: Option<PathBuf>,
    /// The Secondary's backing (the loop device, or the fallback file).
    pub secondary_disk: PathBuf,
    /// What the Secondary's backing is, for the report.
    pub secondary_note: String,
}

impl Setup {
    /// Makes the work dir, removes what an interrupted earlier run left there, and creates
    /// the Secondary's RAM-backed device of `size` bytes.
    pub fn new(work: &Path, size: u64) -> anyhow::Result<Setup> {
        std::fs::create_dir_all(work).with_context(|| format!("create {}", work.display()))?;
        let ram = work.join("ram");
        let img = ram.join("secondary.img");
        Self::stale_cleanup(&ram, &img);
        std::fs::create_dir_all(&ram)?;
        let mut s = Setup {
            work: work.to_path_buf(),
            children: Vec::new(),
            loop_dev: None,
            mount: None,
            secondary_disk: img.clone(),
            secondary_note: String::new(),
        };
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!(
                "size={}",
                size + AL_OUTSIDE + 2 * MD_ROOM + (16 << 20)
            ))
            .arg("tandem-bench")
            .arg(&ram)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        // Without our own mount, /dev/shm is a tmpfs on every systemd Debian.
        let img = if mounted {
            s.mount = Some(ram.clone());
            img
        } else {
            let shm =
                Path::new("/dev/shm").join(format!("tandem-bench-{}.img", std::process::id()));
            s.secondary_note
                .push_str("(mount of a tmpfs failed; file under /dev/shm) ");
            shm
        };
        let f = std::fs::File::create(&img).with_context(|| format!("create {}", img.display()))?;
        f.set_len(size + MD_ROOM)?;
        drop(f);
        match Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {
                let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
                s.secondary_disk = PathBuf::from(&dev);
                s.secondary_note.push_str(&format!(
                    "loop device {dev} over a tmpfs file (RAM), O_DIRECT"
                ));
                s.loop_dev = Some(dev);
            }
            other => {
                let why = match other {
                    Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                s.secondary_disk = img.clone();
                s.secondary_note.push_str(&format!(
                    "NOTE: losetup unavailable ({why}); the Secondary uses the tmpfs file {} \
                     directly",
                    img.display()
                ));
            }
        }
        Ok(s)
    }

    /// A sparse file of `len` bytes in RAM (the run's tmpfs, or /dev/shm): the Secondary
    /// of the activity-log runs.
    pub fn ram_file(&self, name: &str, len: u64) -> anyhow::Result<PathBuf> {
        let path = match &self.mount {
            Some(m) => m.join(name),
            None => {
                Path::new("/dev/shm").join(format!("tandem-bench-{}-{name}", std::process::id()))
            }
        };
        let f =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        f.set_len(len)?;
        Ok(path)
    }

    fn stale_cleanup(ram: &Path, img: &Path) {
        if let Ok(out) = Command::new("losetup").arg("-j").arg(img).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(dev) = line.split(':').next().filter(|d| d.starts_with("/dev/")) {
                    eprintln!("e2e: detaching {dev} left by an earlier run");
                    let _ = Command::new("losetup").args(["-d", dev]).status();
                }
            }
        }
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let ram_s = ram.to_string_lossy();
        if mounts.lines().any(|l| l.split(' ').nth(1) == Some(&*ram_s)) {
            eprintln!("e2e: unmounting {ram_s} left by an earlier run");
            let _ = Command::new("umount").arg(ram).status();
        }
    }

    /// Starts `cmd` with stdout+stderr into `<work>/<name>.log`; killed in `Drop` or by
    /// [`Setup::stop`].
    pub fn spawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name}: {cmd:?}"))?;
        let pid = child.id();
        self.children.push((name.to_string(), child));
        Ok(pid)
    }

    /// Kills the child `name` and waits for it.
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Fails with the tail of `name`'s log if it has exited.
    pub fn check_alive(&mut self, name: &str) -> anyhow::Result<()> {
        let work = self.work.clone();
        if let Some((_, c)) = self.children.iter_mut().find(|(n, _)| n == name) {
            if let Ok(Some(st)) = c.try_wait() {
                let log =
                    std::fs::read_to_string(work.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("{name} exited ({st}); its log ends:\n{}", tail.join("\n"));
            }
        }
        Ok(())
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
        if let Some(m) = self.mount.take() {
            let _ = Command::new("umount").arg(&m).status();
        } else if self.secondary_disk.starts_with("/dev/shm") {
            let _ = std::fs::remove_file(&self.secondary_disk);
        }
    }
}

/// User + system CPU time of `pid` so far, µs (from /proc/PID/stat, in clock ticks).
fn cpu_us(pid: u32, tick_us: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the `(comm)`, which may contain spaces: state is field 3, utime 14.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // rest[0] is field 3, so utime (14) is rest[11] and stime (15) rest[12].
    (t(11) + t(12)) * tick_us
}

fn tick_us() -> f64 {
    run_capture(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .map_or(10_000.0, |hz| 1e6 / hz)
}

/// Runs fio with `args`, bounded by `limit`; its output goes through `<work>/fio.out`.
fn run_fio(work: &Path, args: &[String], limit: Duration) -> anyhow::Result<String> {
    let out_path = work.join("fio.out");
    let err_path = work.join("fio.err");
    // --thread: one process, so the deadline's kill stops the job too (a forked fio job
    // outlives its parent's SIGKILL).
    let mut child = Command::new("fio")
        .args(args)
        .arg("--thread")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .context("start fio")?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "fio did not finish within {limit:?}: fio {}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        bail!(
            "fio failed ({status}): fio {}\n{}\n{}",
            args.join(" "),
            err.trim(),
            out.chars().take(2000).collect::<String>()
        );
    }
    Ok(out)
}

/// The state of one run, threaded through the targets.
struct Run {
    work: PathBuf,
    /// `--quick`: smaller volumes, fewer fills.
    quick: bool,
    size: u64,
    runtime_s: f64,
    tick_us: f64,
    started: Instant,
}

impl Run {
    fn log(&self, msg: &str) {
        eprintln!("[e2e {:6.1}s] {msg}", self.started.elapsed().as_secs_f64());
    }

    fn fill(&self, engine: &Engine) -> anyhow::Result<()> {
        let limit = FIO_SLACK + Duration::from_secs(self.size >> 24); // ≥ 16 MiB/s
        run_fio(&self.work, &fio::fill_args(engine, self.size), limit)?;
        Ok(())
    }

    /// Runs `job` once over `size` bytes for the run's runtime, charging the CPU of
    /// `servers` to it.
    fn job_once(
        &self,
        label: &str,
        engine: &Engine,
        job: Job,
        size: u64,
        servers: &[u32],
    ) -> anyhow::Result<JobResult> {
        let args = fio::job_args(engine, job, size, self.runtime_s);
        let before: f64 = servers.iter().map(|p| cpu_us(*p, self.tick_us)).sum();
        let text = run_fio(
            &self.work,
            &args,
            Duration::from_secs_f64(self.runtime_s) + FIO_SLACK,
        )
        .with_context(|| format!("{label}: {}", job.label()))?;
        let after: f64 = servers.iter().map(|p| cpu_us(*p, self.tick_us)).sum();
        let mut r = fio::parse(&text, job)
            .with_context(|| format!("{label}: {}", job.label()))?
            .result;
        r.server_cpu_us_per_io = (after - before).max(0.0) / r.ios.max(1) as f64;
        Ok(r)
    }

    /// Fills the target, then runs every job, charging the CPU of `servers` to each.
    fn jobs(
        &self,
        label: &str,
        engine: &Engine,
        servers: &[u32],
        fill: bool,
    ) -> anyhow::Result<Vec<(Job, JobResult)>> {
        if fill {
            self.log(&format!("{label}: fill {} MiB", self.size >> 20));
            self.fill(engine)?;
        }
        let mut out = Vec::new();
        for job in Job::ALL {
            let r = self.job_once(label, engine, job, self.size, servers)?;
            self.log(&format!(
                "{label}: {}: {:.0} IOPS, {:.1} MiB/s, p50 {:.1} µs, p99 {:.1} µs",
                job.label(),
                r.iops,
                r.mib_s,
                r.p50_us,
                r.p99_us
            ));
            out.push((job, r));
        }
        Ok(out)
    }
}

/// Polls `f` every 50 ms until it returns `Ok(true)` or `timeout` passes.
fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `{"cmd":...}` request on a tandem management socket; the parsed reply.
fn mgmt(sock: &Path, cmd: &str) -> anyhow::Result<serde_json::Value> {
    mgmt_json(sock, &serde_json::json!({ "cmd": cmd }))
}

/// One request object on a tandem management socket; the parsed reply.
fn mgmt_json(sock: &Path, req: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(s.take(1 << 16)).read_line(&mut line)?;
    Ok(serde_json::from_str(&line)?)
}

fn connection(sock: &Path) -> Option<String> {
    mgmt(sock, "status")
        .ok()?
        .get("status")?
        .get("connection")?
        .as_str()
        .map(str::to_string)
}

fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let l: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    l.iter()
        .map(|x| Ok(x.local_addr()?.port()))
        .collect::<anyhow::Result<_>>()
}

/// A running two-node tandem resource: alpha Primary (exporting NBD), beta Secondary.
struct Cluster {
    alpha_mgmt: PathBuf,
    beta_mgmt: PathBuf,
    uri: String,
    /// alpha's pid, beta's pid.
    pids: Vec<u32>,
    /// The children's names in [`Setup`]: alpha's, beta's.
    names: [String; 2],
    /// What restarts alpha: the binary and its config.
    tandem: PathBuf,
    config: PathBuf,
}

impl Cluster {
    fn stop(&self, setup: &mut Setup) {
        for n in &self.names {
            setup.stop(n);
        }
    }

    /// The Primary's activity-log counters `(transactions, evictions)`.
    fn al_counters(&self) -> anyhow::Result<(u64, u64)> {
        let st = mgmt(&self.alpha_mgmt, "status")?;
        let al = &st["status"]["activity_log"];
        let n = |k: &str| {
            al[k]
                .as_u64()
                .ok_or_else(|| anyhow!("status has no activity_log.{k}: {st}"))
        };
        Ok((n("transactions")?, n("evictions")?))
    }

    /// Kills alpha with SIGKILL (a crash: no clean shutdown, metadata left unclean).
    fn kill_alpha(&self, setup: &mut Setup) {
        setup.stop(&self.names[0]);
    }

    /// Starts alpha again with the same config; it comes back Secondary (the bench
    /// config has no `role`). Returns at once: the caller polls for what it waits for.
    fn restart_alpha(&mut self, setup: &mut Setup) -> anyhow::Result<()> {
        let pid = setup.spawn(
            &self.names[0],
            Command::new(&self.tandem)
                .args(["up", "--config"])
                .arg(&self.config)
                .args(["--node", "alpha"]),
        )?;
        if let Some(p) = self.pids.first_mut() {
            *p = pid;
        }
        Ok(())
    }
}

/// What [`start_cluster`] builds.
struct Spec<'a> {
    /// `A` or `C`.
    protocol: &'a str,
    /// alpha's (the Primary's) and beta's backing.
    disks: (&'a Path, &'a Path),
    al_extents: u32,
    /// Names the cluster's sockets, config and logs (`tandem-alpha-<tag>.log`).
    tag: String,
    /// Extra lines for the config's `[net]` table.
    net: &'a str,
}

impl<'a> Spec<'a> {
    /// A plain cluster, tagged by protocol and `al-extents`.
    fn new(protocol: &'a str, disks: (&'a Path, &'a Path), al_extents: u32) -> Spec<'a> {
        Spec {
            protocol,
            disks,
            al_extents,
            tag: format!("{}-{al_extents}", protocol.to_lowercase()),
            net: "",
        }
    }
}

/// Writes fresh metadata on `disk` (`tandem create-md --force`): every cluster starts
/// with a clean bitmap and activity log.
fn create_md(tandem: &Path, disk: &Path, node_id: u32, al_extents: u32) -> anyhow::Result<()> {
    run_capture(
        Command::new(tandem)
            .arg("create-md")
            .arg("--force")
            .arg(format!("--node-id={node_id}"))
            .arg(format!("--al-extents={al_extents}"))
            .arg(disk),
    )
    .with_context(|| format!("tandem create-md {}", disk.display()))?;
    Ok(())
}

fn start_cluster(setup: &mut Setup, tandem: &Path, spec: &Spec) -> anyhow::Result<Cluster> {
    let (primary_disk, secondary_disk) = spec.disks;
    let (protocol, al_extents, tag) = (spec.protocol, spec.al_extents, &spec.tag);
    create_md(tandem, primary_disk, 0, al_extents)?;
    create_md(tandem, secondary_disk, 1, al_extents)?;
    let w = setup.work.clone();
    let ports = free_ports(2)?;
    let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap_or_default();
    let alpha_mgmt = w.join(format!("alpha-{tag}.sock"));
    let beta_mgmt = w.join(format!("beta-{tag}.sock"));
    let nbd = w.join(format!("tandem-{tag}.nbd"));
    for p in [&alpha_mgmt, &beta_mgmt, &nbd] {
        let _ = std::fs::remove_file(p);
    }
    let config = format!(
        "[resource]\nname = \"bench\"\nprotocol = \"{protocol}\"\n\n[net]\nconnect-int = 1\n{}\n\
         [disk]\nal-extents = {al_extents}\n\n\
         [[node]]\nname = \"alpha\"\naddress = \"127.0.0.1:{}\"\ndisk = {}\n\
         nbd-socket = {}\nmgmt-socket = {}\n\n\
         [[node]]\nname = \"beta\"\naddress = \"127.0.0.1:{}\"\ndisk = {}\nmgmt-socket = {}\n",
        spec.net,
        ports[0],
        q(primary_disk),
        q(&nbd),
        q(&alpha_mgmt),
        ports[1],
        q(secondary_disk),
        q(&beta_mgmt),
    );
    let cfg = w.join(format!("tandem-{tag}.toml"));
    std::fs::write(&cfg, config)?;
    let mut pids = Vec::new();
    for node in ["alpha", "beta"] {
        let name = format!("tandem-{node}-{tag}");
        pids.push(
            setup.spawn(
                &name,
                Command::new(tandem)
                    .args(["up", "--config"])
                    .arg(&cfg)
                    .args(["--node", node]),
            )?,
        );
    }
    wait_for("tandem protocol to connect", CONNECT_TIMEOUT, || {
        setup.check_alive(&format!("tandem-alpha-{tag}"))?;
        setup.check_alive(&format!("tandem-beta-{tag}"))?;
        Ok(connection(&alpha_mgmt).as_deref() == Some("Connected"))
    })?;
    // Fresh metadata on zeroed files: declare them equal (no initial full sync), then
    // promote alpha — what an operator does for a new pair of thin volumes.
    let ok = |r: serde_json::Value, what: &str| {
        if r["ok"] == true {
            Ok(())
        } else {
            Err(anyhow::anyhow!("{what}: {}", r["error"]))
        }
    };
    ok(
        mgmt_json(
            &alpha_mgmt,
            &serde_json::json!({"cmd": "new-current-uuid", "clear-bitmap": true}),
        )?,
        "new-current-uuid --clear-bitmap",
    )?;
    wait_for("both disks UpToDate", CONNECT_TIMEOUT, || {
        let up = |s: &Path| {
            mgmt(s, "status")
                .ok()
                .and_then(|v| v["status"]["disk"].as_str().map(|d| d == "UpToDate"))
        };
        Ok(up(&alpha_mgmt) == Some(true) && up(&beta_mgmt) == Some(true))
    })?;
    ok(mgmt(&alpha_mgmt, "primary")?, "primary")?;
    Ok(Cluster {
        alpha_mgmt,
        beta_mgmt,
        uri: format!("nbd+unix:///?socket={}", nbd.display()),
        pids,
        names: [format!("tandem-alpha-{tag}"), format!("tandem-beta-{tag}")],
        tandem: tandem.to_path_buf(),
        config: cfg,
    })
}

/// Median and 99th percentile round trip of a 4 KiB message answered by a 32-byte ack on
/// 127.0.0.1 (TCP_NODELAY both ways), for about `secs` seconds; µs.
pub fn tcp_rtt(secs: u32) -> anyhow::Result<(f64, f64)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut msg = [0u8; 4096];
        let ack = [0u8; ACK_LEN];
        loop {
            if s.read_exact(&mut msg).is_err() {
                return Ok(()); // client closed
            }
            s.write_all(&ack)?;
        }
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let msg = [0x5au8; 4096];
    let mut ack = [0u8; ACK_LEN];
    let mut samples = Vec::with_capacity(RTT_MAX_SAMPLES);
    let end = Instant::now() + Duration::from_secs(u64::from(secs));
    while Instant::now() < end && samples.len() < RTT_MAX_SAMPLES {
        let t = Instant::now();
        c.write_all(&msg)?;
        c.read_exact(&mut ack)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(c);
    let _ = server.join();
    if samples.is_empty() {
        bail!("TCP probe measured no round trip");
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((samples.len() - 1) as f64 * q).round();
        samples[format!("{i:.0}")
            .parse::<usize>()
            .unwrap_or(0)
            .min(samples.len() - 1)]
    };
    Ok((at(0.5), at(0.99)))
}

/// Loopback TCP bandwidth with iperf3 (one stream, `secs` seconds), MiB/s.
fn tcp_bw(setup: &mut Setup, secs: u32) -> anyhow::Result<f64> {
    let port = free_ports(1)?[0].to_string();
    setup.spawn(
        "iperf3-server",
        Command::new("iperf3").args(["-s", "-B", "127.0.0.1", "-p", &port]),
    )?;
    let deadline = Instant::now() + START_TIMEOUT;
    // The server needs a moment to listen: the client retries until a test completes.
    let result = loop {
        let out = Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                &port,
                "-J",
                "-t",
                &secs.to_string(),
            ])
            .stdin(Stdio::null())
            .output()?;
        let bps = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.pointer("/end/sum_received/bits_per_second")?.as_f64())
            .filter(|b| out.status.success() && *b > 0.0);
        if let Some(bps) = bps {
            break Ok(bps / 8.0 / f64::from(1u32 << 20));
        }
        if Instant::now() > deadline {
            break Err(anyhow!(
                "iperf3 client failed ({}): {:.600}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    setup.stop("iperf3-server");
    result
}

/// `YYYY-MM-DD HH:MM:SS` UTC of `t`.
pub fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn git(args: &[&str]) -> Option<String> {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let out = Command::new("git")
        .arg("-C")
        .arg(ws)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn commit() -> String {
    let hash = git(&["rev-parse", "--short=10", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // Results files written by earlier runs do not make the code dirty.
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!bench/results",
    ])
    .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{hash}-dirty")
    } else {
        hash
    }
}

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let host = read("/proc/sys/kernel/hostname").trim().to_string();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / f64::from(1u32 << 20));
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    format!("{host}, {model}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {kernel}")
}

fn tool_version(cmd: &str, arg: &str) -> String {
    run_capture(Command::new(cmd).arg(arg))
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| format!("{cmd} (version unknown)"))
}

/// The tandem binary: `opts.tandem`, or built with cargo into this runner's target dir.
fn tandem_binary(opts: &Opts) -> anyhow::Result<PathBuf> {
    if let Some(p) = &opts.tandem {
        if !p.is_file() {
            bail!("--tandem {} does not exist", p.display());
        }
        return Ok(p.clone());
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("no directory for {}", exe.display()))?;
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The runner is `<target>/release/e2e`: build tandem next to it, so the binary
    // measured is the code of this commit.
    let target = dir
        .parent()
        .ok_or_else(|| anyhow!("no target dir for {}", exe.display()))?;
    let st = Command::new(cargo)
        .current_dir(ws)
        .args([
            "build",
            "--release",
            "-p",
            "tandem-engine",
            "--bin",
            "tandem",
        ])
        .env("CARGO_TARGET_DIR", target)
        .status()
        .context("run cargo build for tandem")?;
    if !st.success() {
        bail!("cargo build --release -p tandem-engine --bin tandem failed");
    }
    let p = target.join("release").join("tandem");
    if !p.is_file() {
        bail!("built tandem not found at {}", p.display());
    }
    Ok(p)
}

/// Why there is no ublk column on this machine.
fn ublk_unavailable() -> String {
    if Path::new("/dev/ublk-control").exists() || Path::new("/sys/module/ublk_drv").exists() {
        "n/a (tandem has no ublk frontend yet)".into()
    } else {
        "n/a (no ublk_drv)".into()
    }
}

/// Runs the whole comparison and returns the report (nothing written).
pub fn run(opts: &Opts) -> anyhow::Result<Report> {
    let started = Instant::now();
    let size = opts.size_bytes()?;
    let runtime_s = opts.runtime_s();
    ensure_tools(opts.no_install)?;
    let tandem = tandem_binary(opts)?;
    let date = utc(SystemTime::now());
    let mut setup = Setup::new(&opts.work_dir, size)?;
    let run = Run {
        work: opts.work_dir.clone(),
        quick: opts.quick,
        size,
        runtime_s,
        tick_us: tick_us(),
        started,
    };
    run.log(&format!(
        "size {} MiB, {runtime_s} s per job; Secondary: {}",
        size >> 20,
        setup.secondary_note
    ));

    // Limits.
    let (rtt50, rtt99) = tcp_rtt(opts.probe_s())?;
    let bw = tcp_bw(&mut setup, opts.probe_s())?;
    let limits = Limits {
        tcp_rtt_p50_us: rtt50,
        tcp_rtt_p99_us: rtt99,
        tcp_bw_mib_s: bw,
    };
    run.log(&format!(
        "TCP 4 KiB RTT p50 {rtt50:.1} µs p99 {rtt99:.1} µs; loopback {bw:.0} MiB/s"
    ));
    let primary = opts.work_dir.join("primary.img");
    let _ = std::fs::remove_file(&primary);
    std::fs::File::create(&primary)?.set_len(size + MD_ROOM)?;
    let file_results = run.jobs(
        "file",
        &Engine::File(primary.to_string_lossy().into_owned()),
        &[],
        true,
    )?;

    // Peer: nbdkit's file plugin on the same backing file.
    let nbdkit_sock = opts.work_dir.join("nbdkit.sock");
    let _ = std::fs::remove_file(&nbdkit_sock);
    let nbdkit_pid = setup.spawn(
        "nbdkit",
        Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&nbdkit_sock)
            .arg("file")
            .arg(format!("file={}", primary.display())),
    )?;
    wait_for("nbdkit socket", START_TIMEOUT, || {
        setup.check_alive("nbdkit")?;
        Ok(UnixStream::connect(&nbdkit_sock).is_ok())
    })?;
    let nbdkit_results = run.jobs(
        "nbdkit",
        &Engine::Nbd(format!("nbd+unix:///?socket={}", nbdkit_sock.display())),
        &[nbdkit_pid],
        true,
    )?;
    setup.stop("nbdkit");

    // tandem, protocol A.
    let secondary = setup.secondary_disk.clone();
    let disks = (primary.as_path(), secondary.as_path());
    let a = start_cluster(&mut setup, &tandem, &Spec::new("A", disks, DEFAULT_AL))?;
    let a_results = run.jobs("tandem A", &Engine::Nbd(a.uri.clone()), &a.pids, true)?;
    a.stop(&mut setup);

    // tandem, protocol C, then the same daemons with the peer disconnected.
    let c = start_cluster(&mut setup, &tandem, &Spec::new("C", disks, DEFAULT_AL))?;
    let c_results = run.jobs("tandem C", &Engine::Nbd(c.uri.clone()), &c.pids, true)?;
    let main_resync = resync::full(
        &run,
        &c,
        "full: `invalidate`, Secondary in RAM",
        "file → loop on tmpfs",
        bw,
    )?;
    let reply = mgmt(&c.alpha_mgmt, "disconnect")?;
    if reply.get("ok") != Some(&serde_json::Value::Bool(true)) {
        bail!("tandem disconnect refused: {reply}");
    }
    wait_for("tandem StandAlone", START_TIMEOUT, || {
        Ok(connection(&c.alpha_mgmt).as_deref() == Some("StandAlone"))
    })?;
    let sa_results = run.jobs(
        "tandem disconnected",
        &Engine::Nbd(c.uri.clone()),
        &c.pids,
        false,
    )?;
    c.stop(&mut setup);

    let al_cost = al_cost(&run, &mut setup, &tandem)?;
    let resync = resync::section(&run, &mut setup, &tandem, main_resync, bw)?;

    let targets = vec![
        Target {
            key: "file".into(),
            label: "backing file".into(),
            note: "the Primary's backing file (on this machine's disk) driven by fio io_uring, \
                   direct=1; no server"
                .into(),
            unavailable: None,
            results: file_results,
        },
        Target {
            key: "nbdkit".into(),
            label: "nbdkit file".into(),
            note: "nbdkit's file plugin (Debian's nbdkit, default cache: page cache, no O_DIRECT) \
                   on the same file, fio nbd engine over a Unix socket; no replication"
                .into(),
            unavailable: None,
            results: nbdkit_results,
        },
        Target {
            key: "standalone".into(),
            label: "tandem disconnected".into(),
            note:
                "tandem Primary after `tandem disconnect` (serves alone, marks out-of-sync), fio \
                 nbd engine over its nbd-socket"
                    .into(),
            unavailable: None,
            results: sa_results,
        },
        Target {
            key: "protocol-c".into(),
            label: "tandem C".into(),
            note: format!(
                "tandem protocol C, Primary on the file, Secondary on a {}; server CPU is both \
                 daemons",
                setup.secondary_note
            ),
            unavailable: None,
            results: c_results,
        },
        Target {
            key: "protocol-a".into(),
            label: "tandem A".into(),
            note: "tandem protocol A, same setup as C".into(),
            unavailable: None,
            results: a_results,
        },
        Target {
            key: "ublk".into(),
            label: "tandem ublk".into(),
            note: "tandem through ublk: needs the kernel's ublk_drv and tandem's ublk frontend"
                .into(),
            unavailable: Some(ublk_unavailable()),
            results: Vec::new(),
        },
    ];
    let ratios = report::ratios(&targets, &limits);
    let notes = vec![
        format!("Secondary backing: {}.", setup.secondary_note),
        "Every target is filled (1 MiB sequential writes over the whole volume) before its first \
         job; `tandem disconnected` runs on the filled volume right after `tandem C`."
            .into(),
        "Latency is fio's total latency (submission to completion). CPU µs/IO = fio usr+sys × \
         runtime / IOs + the server processes' utime+stime over the job / IOs; fio and both \
         daemons share the cores."
            .into(),
    ];
    drop(setup);
    Ok(Report {
        meta: Meta {
            date,
            commit: commit(),
            machine: machine(),
            size_bytes: size,
            runtime_s,
            quick: opts.quick,
            tools: vec![
                tool_version("fio", "--version"),
                tool_version("nbdkit", "--version"),
                tool_version("iperf3", "--version")
                    .split(" (")
                    .next()
                    .unwrap_or("iperf3")
                    .to_string(),
            ],
            notes,
            wall_s: started.elapsed().as_secs_f64(),
        },
        limits,
        targets,
        ratios,
        al_cost,
        resync: Some(resync),
    })
}

/// tandem's default `al-extents` (DRBD's).
const DEFAULT_AL: u32 = 1237;

/// The activity log's cost: 4 KiB random writes at QD32, protocol C, on a volume of
/// [`AL_OUTSIDE`] (a sparse file; the Secondary a sparse file in RAM): with `al-extents`
/// 67 over 64 extents (every write a hit once warm) and over 8 × the log's reach (most
/// writes miss and wait for a transaction), then with the default 1237 over the same 8 ×
/// working set (all hits again).
fn al_cost(run: &Run, setup: &mut Setup, tandem: &Path) -> anyhow::Result<Vec<AlCost>> {
    let primary = run.work.join("al-primary.img");
    let _ = std::fs::remove_file(&primary);
    std::fs::File::create(&primary)?.set_len(AL_OUTSIDE + MD_ROOM)?;
    let secondary = setup.ram_file("al-secondary.img", AL_OUTSIDE + MD_ROOM)?;
    let mut out = Vec::new();
    for (al_extents, sets) in [
        (
            AL_SMALL,
            vec![
                ("inside the log", AL_INSIDE),
                ("8 × the log's reach", AL_OUTSIDE),
            ],
        ),
        (DEFAULT_AL, vec![("8 × the small log's reach", AL_OUTSIDE)]),
    ] {
        let c = start_cluster(
            setup,
            tandem,
            &Spec::new("C", (primary.as_path(), secondary.as_path()), al_extents),
        )?;
        let engine = Engine::Nbd(c.uri.clone());
        let label = format!("al-extents {al_extents}");
        // Both replicas hold the first cluster's fill; a full run fills again so the
        // default log starts warm, as the small one does. --quick skips it (9 s of 70).
        if !(run.quick && al_extents == DEFAULT_AL) {
            run.log(&format!("{label}: fill {} MiB", AL_OUTSIDE >> 20));
            run_fio(
                &run.work,
                &fio::fill_args(&engine, AL_OUTSIDE),
                FIO_SLACK + Duration::from_secs(AL_OUTSIDE >> 24),
            )?;
        }
        for (what, ws) in sets {
            let (t0, e0) = c.al_counters()?;
            let r = run
                .job_once(&label, &engine, Job::RandWrite4kQd32, ws, &c.pids)
                .with_context(|| what.to_string())?;
            let (t1, e1) = c.al_counters()?;
            run.log(&format!(
                "{label}, {what}: {:.0} IOPS, p99 {:.1} µs, {} AL transactions, {} evictions",
                r.iops,
                r.p99_us,
                t1 - t0,
                e1 - e0
            ));
            out.push(AlCost {
                label: format!("{} MiB ({what})", ws >> 20),
                al_extents,
                working_set_bytes: ws,
                result: r,
                transactions: t1 - t0,
                evictions: e1 - e0,
            });
        }
        c.stop(setup);
    }
    let _ = std::fs::remove_file(&secondary);
    let _ = std::fs::remove_file(&primary);
    Ok(out)
}

/// Writes `<out>/<date>-<commit>.{md,json,svg}`; returns the markdown path.
pub fn write(report: &Report, out_dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out_dir)?;
    let day = report.meta.date.split(' ').next().unwrap_or("date");
    let stem = format!("{day}-{}", report.meta.commit);
    let md = out_dir.join(format!("{stem}.md"));
    std::fs::write(&md, report.to_markdown())?;
    std::fs::write(out_dir.join(format!("{stem}.json")), report.to_json())?;
    std::fs::write(out_dir.join(format!("{stem}.svg")), report.to_svg())?;
    Ok(md)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01 00:00:00");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661); // 2000-02-29
        assert_eq!(utc(t), "2000-02-29 01:01:01");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB"), Some(256 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("1000"), None); // not a whole MiB
        assert_eq!(parse_size("9999999999999G"), None);
        assert_eq!(parse_size("x"), None);
    }

    #[test]
    fn tcp_probe_measures_round_trips() {
        let (p50, p99) = tcp_rtt(1).unwrap();
        assert!(p50 > 0.0 && p99 >= p50);
    }
}
