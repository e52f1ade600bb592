//! The resync section of the end-to-end run (issue 5): how fast a full resync runs against
//! the loopback limit, how much a crash resync saves over a full one, and what a full
//! resync costs the application.
//!
//! - [`full`]: `invalidate` on the idle Secondary (it marks every block out of sync and
//!   reconnects as SyncTarget), timed until both nodes report `Connected`, `UpToDate` and 0
//!   bytes out of sync. The runner calls it on the main protocol-C pair (Secondary in RAM)
//!   and [`section`] on a second volume.
//! - [`section`]: a volume of [`BIG`] (8 GiB; with `--quick` 4 × the run's size, at most
//!   1 GiB) whose two replicas are files on the machine's disk (two 8 GiB replicas do not
//!   fit in the RAM beside the rest): a full resync; 4 KiB random writes at QD32 in sync
//!   and right after an `invalidate` ([`io_during_resync`]); a crash resync ([`crash`]:
//!   SIGKILL of the Primary under those writes, restart), then the same with
//!   `csums-alg = "crc32c"` and `csums-after-crash-only`.
//!
//! Everything runs with tandem's default resync controller (the config sets no rate).
//! Bounds: every wait ends at [`deadline`] (120 s + the volume at 16 MiB/s: 632 s for
//! 8 GiB); status is polled every [`POLL`] (the time's resolution), sampled every
//! [`SAMPLE`] during a job.

use super::{
    cpu_us, fio, mgmt, run_fio, start_cluster, Cluster, Engine, Run, Setup, Spec, DEFAULT_AL,
    FIO_SLACK, MD_ROOM,
};
use crate::report::{Job, ResyncIo, ResyncReport, ResyncRun};
use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The volume of the crash-vs-full comparison in a full run (issue 5 asks for 8 GiB).
pub const BIG: u64 = 8 << 30;
/// With `--quick`: this many times the run's volume, at most [`QUICK_MAX`].
const QUICK_FACTOR: u64 = 4;
const QUICK_MAX: u64 = 1 << 30;
/// How often a wait polls the status: the resolution of every resync time.
pub const POLL: Duration = Duration::from_millis(50);
/// How often the status is sampled while fio runs beside a resync.
pub const SAMPLE: Duration = Duration::from_millis(100);
/// fio runs this long (at most; the run's runtime if shorter) before the Primary is killed.
const CRASH_FIO_S: f64 = 5.0;
/// Free space kept on the work dir's file system beyond the two replicas.
const DISK_MARGIN: u64 = 1 << 30;
/// One bitmap block.
const BLOCK: u64 = 4096;
const MIB: f64 = 1_048_576.0;

/// The longest a resync of `bytes` may take: 120 s plus the volume at 16 MiB/s.
pub fn deadline(bytes: u64) -> Duration {
    Duration::from_secs(120 + (bytes >> 24))
}

/// The `status` object of the node behind `sock`.
fn status(sock: &Path) -> anyhow::Result<Value> {
    let r = mgmt(sock, "status")?;
    r.get("status")
        .cloned()
        .ok_or_else(|| anyhow!("{}: status reply without `status`: {r}", sock.display()))
}

/// Connected, UpToDate, nothing out of sync.
fn in_sync(st: &Value) -> bool {
    st["connection"] == "Connected" && st["disk"] == "UpToDate" && st["out_of_sync_bytes"] == 0
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn ok(reply: &Value, what: &str) -> anyhow::Result<()> {
    if reply["ok"] == true {
        Ok(())
    } else {
        bail!("{what} refused: {reply}")
    }
}

/// Polls both nodes until both are in sync and one of them has a `last_resync` other than
/// the one in `before` (alpha's, beta's status before the run; `Null` for a restarted
/// node). Returns both statuses and the index of the SyncTarget (0 alpha, 1 beta).
fn wait_resynced(
    c: &Cluster,
    before: &[Value; 2],
    limit: Duration,
    alive: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<([Value; 2], usize)> {
    let start = Instant::now();
    loop {
        alive()?;
        let a = status(&c.alpha_mgmt).unwrap_or(Value::Null);
        let b = status(&c.beta_mgmt).unwrap_or(Value::Null);
        if in_sync(&a) && in_sync(&b) {
            let new = |i: usize, st: &Value| {
                !st["last_resync"].is_null()
                    && before.get(i).map(|x| &x["last_resync"]) != Some(&st["last_resync"])
            };
            if new(0, &a) {
                return Ok(([a, b], 0));
            }
            if new(1, &b) {
                return Ok(([a, b], 1));
            }
        }
        if start.elapsed() > limit {
            bail!("no resync finished within {limit:?}; last status: alpha {a} beta {b}");
        }
        std::thread::sleep(POLL);
    }
}

/// What a run measured besides the statuses.
struct Measured<'a> {
    label: &'a str,
    kind: &'a str,
    disks: &'a str,
    wall: Duration,
    /// CPU µs of alpha and beta during the run.
    cpu_us: [f64; 2],
    bw_mib_s: f64,
    al_active_extents: Option<u64>,
}

/// One [`ResyncRun`] from the statuses at the end and before.
fn summarize(m: &Measured, end: &[Value; 2], target: usize, before: &[Value; 2]) -> ResyncRun {
    let source = 1 - target;
    let (tgt, src) = (&end[target], &end[source]);
    let last = &tgt["last_resync"];
    let resynced = num(&last["total_blocks"]) * BLOCK;
    let delta = |k: &str| num(&src[k]).saturating_sub(num(&before[source][k]));
    let wall_s = m.wall.as_secs_f64();
    let mib_s = resynced as f64 / MIB / wall_s.max(1e-9);
    ResyncRun {
        label: m.label.into(),
        kind: m.kind.into(),
        volume_bytes: num(&tgt["size_bytes"]),
        disks: m.disks.into(),
        wall_s,
        active_s: num(&last["active_ms"]) as f64 / 1000.0,
        target: tgt["node"].as_str().unwrap_or("?").into(),
        resynced_bytes: resynced,
        same_csum_bytes: num(&last["same_csum_blocks"]) * BLOCK,
        failed_blocks: num(&last["failed_blocks"]),
        data_sent_bytes: delta("resync_bytes_sent"),
        net_tx_bytes: delta("net_tx_bytes"),
        mib_s,
        vs_loopback: if m.bw_mib_s > 0.0 {
            mib_s / m.bw_mib_s
        } else {
            f64::NAN
        },
        source_cpu_s: m.cpu_us[source] / 1e6,
        target_cpu_s: m.cpu_us[target] / 1e6,
        al_active_extents: m.al_active_extents,
    }
}

fn cpu_pair(c: &Cluster, tick_us: f64) -> [f64; 2] {
    let at = |i: usize| c.pids.get(i).map_or(0.0, |p| cpu_us(*p, tick_us));
    [at(0), at(1)]
}

/// A full resync on the connected, idle pair `c`: `invalidate` on beta, timed until both
/// nodes are in sync again. `bw_mib_s` is the run's loopback TCP bandwidth.
pub(super) fn full(
    run: &Run,
    c: &Cluster,
    label: &str,
    disks: &str,
    bw_mib_s: f64,
) -> anyhow::Result<ResyncRun> {
    let before = [status(&c.alpha_mgmt)?, status(&c.beta_mgmt)?];
    let size = num(&before[1]["size_bytes"]);
    let cpu0 = cpu_pair(c, run.tick_us);
    let t0 = Instant::now();
    ok(&mgmt(&c.beta_mgmt, "invalidate")?, "invalidate")?;
    let (end, target) = wait_resynced(c, &before, deadline(size), &mut || Ok(()))
        .with_context(|| format!("{label}: full resync"))?;
    let wall = t0.elapsed();
    let cpu1 = cpu_pair(c, run.tick_us);
    let r = summarize(
        &Measured {
            label,
            kind: "full",
            disks,
            wall,
            cpu_us: [cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]],
            bw_mib_s,
            al_active_extents: None,
        },
        &end,
        target,
        &before,
    );
    run.log(&format!(
        "resync {label}: {} MiB in {:.2} s = {:.0} MiB/s ({:.2} × loopback), target {}, CPU {:.1} \
         + {:.1} s",
        r.resynced_bytes >> 20,
        r.wall_s,
        r.mib_s,
        r.vs_loopback,
        r.target,
        r.source_cpu_s,
        r.target_cpu_s
    ));
    Ok(r)
}

/// One status sample taken while fio runs beside a resync.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Seconds after the `invalidate`.
    t: f64,
    /// The SyncTarget's (beta's) out-of-sync bytes.
    oos: u64,
    /// Whether beta was in sync with a new `last_resync` (the resync is over).
    done: bool,
    /// `throttled_steps` of the SyncTarget (beta) and the SyncSource (alpha), the last
    /// values seen while each side's resync ran.
    target_throttled: u64,
    source_throttled: u64,
    /// The SyncTarget's `rate_kib`, while it runs.
    rate_kib: Option<f64>,
}

/// Samples kept at most (one per [`SAMPLE`]: 10,000 s of job).
const MAX_SAMPLES: usize = 100_000;

/// 4 KiB random writes at QD32 on the Primary right after an `invalidate` on beta, while
/// the full resync runs; then waits for the resync to end. The job's IO window is the
/// last `runtime` seconds before fio exited (fio spends its first moments connecting);
/// the resync's progress, throttled steps and rate are taken from the samples inside it.
fn io_during_resync(run: &Run, c: &Cluster, size: u64) -> anyhow::Result<ResyncIo> {
    let before_b = status(&c.beta_mgmt)?;
    let engine = Engine::Nbd(c.uri.clone());
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    ok(&mgmt(&c.beta_mgmt, "invalidate")?, "invalidate")?;
    let (result, samples) = std::thread::scope(|sc| {
        let sampler = sc.spawn(|| {
            let mut v: Vec<Sample> = Vec::new();
            let (mut tt, mut st) = (0, 0);
            while !stop.load(Ordering::Relaxed) && v.len() < MAX_SAMPLES {
                let b = status(&c.beta_mgmt).unwrap_or(Value::Null);
                let a = status(&c.alpha_mgmt).unwrap_or(Value::Null);
                let t = t0.elapsed().as_secs_f64();
                let target = b["resync"]["role"] == "SyncTarget";
                if target {
                    tt = num(&b["resync"]["throttled_steps"]);
                }
                if a["resync"]["role"] == "SyncSource" {
                    st = num(&a["resync"]["throttled_steps"]);
                }
                if !b.is_null() {
                    v.push(Sample {
                        t,
                        oos: num(&b["out_of_sync_bytes"]),
                        done: in_sync(&b)
                            && !b["last_resync"].is_null()
                            && b["last_resync"] != before_b["last_resync"],
                        target_throttled: tt,
                        source_throttled: st,
                        rate_kib: if target {
                            b["resync"]["rate_kib"].as_f64()
                        } else {
                            None
                        },
                    });
                }
                std::thread::sleep(SAMPLE);
            }
            v
        });
        let r = run.job_once(
            "during a full resync",
            &engine,
            Job::RandWrite4kQd32,
            size,
            &c.pids,
        );
        stop.store(true, Ordering::Relaxed);
        let v = sampler.join().unwrap_or_default();
        (r, v)
    });
    let result = result?;
    let io_end = t0.elapsed().as_secs_f64();
    let io_start = (io_end - run.runtime_s).max(0.0);
    // alpha is the SyncSource: its last_resync does not change; beta's does.
    let before = [status(&c.alpha_mgmt)?, before_b];
    wait_resynced(c, &before, deadline(size), &mut || Ok(()))
        .context("full resync after the IO job")?;
    let resync_wall_s = t0.elapsed().as_secs_f64();
    let window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t >= io_start && s.t <= io_end)
        .collect();
    let (first, last) = match (window.first(), window.last()) {
        (Some(f), Some(l)) => (**f, **l),
        _ => bail!("no status sample inside the IO job ({io_start:.2}..{io_end:.2} s)"),
    };
    let ended = window.iter().find(|s| s.done).map(|s| s.t);
    let overlap_s = (ended.unwrap_or(io_end) - io_start).max(0.0);
    let oos_end = if ended.is_some() { 0 } else { last.oos };
    let resync_bytes = first.oos.saturating_sub(oos_end);
    let rates: Vec<f64> = window.iter().filter_map(|s| s.rate_kib).collect();
    let io = ResyncIo {
        label: "a full resync runs".into(),
        result,
        during_resync: true,
        overlap_s,
        resync_bytes,
        resync_mib_s: resync_bytes as f64 / MIB / overlap_s.max(1e-9),
        throttled_steps_target: last.target_throttled.saturating_sub(first.target_throttled),
        throttled_steps_source: last.source_throttled.saturating_sub(first.source_throttled),
        mean_rate_kib: if rates.is_empty() {
            0.0
        } else {
            rates.iter().sum::<f64>() / rates.len() as f64
        },
        resync_wall_s,
    };
    run.log(&format!(
        "during a full resync: {:.0} IOPS, p99 {:.1} µs; resync {} MiB in {:.1} s of the job \
         ({:.1} MiB/s), throttled steps {} / {}, whole resync {:.1} s",
        io.result.iops,
        io.result.p99_us,
        io.resync_bytes >> 20,
        io.overlap_s,
        io.resync_mib_s,
        io.throttled_steps_target,
        io.throttled_steps_source,
        io.resync_wall_s
    ));
    Ok(io)
}

/// Starts fio with `args` in the background (output in `<work>/fio-crash.*`).
fn spawn_fio(work: &Path, args: &[String]) -> anyhow::Result<Child> {
    Command::new("fio")
        .args(args)
        .arg("--thread")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(work.join("fio-crash.out"))?)
        .stderr(std::fs::File::create(work.join("fio-crash.err"))?)
        .spawn()
        .context("start fio")
}

/// A crash resync: fio 4 KiB random writes at QD32 on the Primary (alpha) for `fio_s`,
/// SIGKILL of alpha while fio runs, fio stopped, alpha restarted with the same config
/// (it comes back Secondary); timed from the restart until both nodes are in sync.
fn crash(
    run: &Run,
    setup: &mut Setup,
    c: &mut Cluster,
    m: (&str, &str, &str),
    fio_s: f64,
    bw_mib_s: f64,
) -> anyhow::Result<ResyncRun> {
    let (label, kind, disks) = m;
    let size = num(&status(&c.alpha_mgmt)?["size_bytes"]);
    let engine = Engine::Nbd(c.uri.clone());
    // Time-based well past the kill: fio never ends on its own before it.
    let args = fio::job_args(&engine, Job::RandWrite4kQd32, size, fio_s + 600.0);
    let mut fio = spawn_fio(&run.work, &args)?;
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < fio_s {
        if let Some(st) = fio.try_wait()? {
            let err = std::fs::read_to_string(run.work.join("fio-crash.err")).unwrap_or_default();
            bail!("{label}: fio ended before the kill ({st}): {}", err.trim());
        }
        std::thread::sleep(POLL);
    }
    let al_active = status(&c.alpha_mgmt)?["activity_log"]["active"].as_u64();
    c.kill_alpha(setup);
    let _ = fio.kill();
    let _ = fio.wait();
    let before = [Value::Null, status(&c.beta_mgmt)?];
    let beta_cpu0 = cpu_pair(c, run.tick_us)[1];
    let t0 = Instant::now();
    c.restart_alpha(setup)?;
    let name = c.names[0].clone();
    let (end, target) = wait_resynced(c, &before, deadline(size), &mut || setup.check_alive(&name))
        .with_context(|| format!("{label}: crash resync"))?;
    let wall = t0.elapsed();
    let cpu1 = cpu_pair(c, run.tick_us);
    let r = summarize(
        &Measured {
            label,
            kind,
            disks,
            wall,
            cpu_us: [cpu1[0], cpu1[1] - beta_cpu0],
            bw_mib_s,
            al_active_extents: al_active,
        },
        &end,
        target,
        &before,
    );
    run.log(&format!(
        "resync {label}: {} MiB out of sync ({} AL extents active at the kill), {:.2} s from \
         restart, target {}, {} MiB sent, {} MiB equal by checksum",
        r.resynced_bytes >> 20,
        al_active.map_or("?".into(), |n| n.to_string()),
        r.wall_s,
        r.target,
        r.data_sent_bytes >> 20,
        r.same_csum_bytes >> 20
    ));
    Ok(r)
}

/// Files removed when dropped (the replicas of [`section`], 16 GiB on a full run).
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Bytes free on the file system of `dir` (`df`), if it can tell.
fn free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// The volume [`section`] uses for a run of `size` bytes per target.
pub fn section_size(quick: bool, size: u64) -> u64 {
    if quick {
        (QUICK_FACTOR * size).min(QUICK_MAX)
    } else {
        BIG
    }
}

/// The resync section on its own volume (see the module docs). `main` is the full resync
/// the runner measured on its main pair; it leads the table.
pub(super) fn section(
    run: &Run,
    setup: &mut Setup,
    tandem: &Path,
    main: ResyncRun,
    bw_mib_s: f64,
) -> anyhow::Result<ResyncReport> {
    let size = section_size(run.quick, run.size);
    let need = 2 * (size + MD_ROOM) + DISK_MARGIN;
    if let Some(free) = free_bytes(&run.work) {
        if free < need {
            bail!(
                "the resync section needs {} MiB free under {} (two {} MiB replicas on disk); {} \
                 MiB are",
                need >> 20,
                run.work.display(),
                size >> 20,
                free >> 20
            );
        }
    }
    let alpha = run.work.join("resync-alpha.img");
    let beta = run.work.join("resync-beta.img");
    let _scratch = Scratch(vec![alpha.clone(), beta.clone()]);
    for p in [&alpha, &beta] {
        let _ = std::fs::remove_file(p);
        std::fs::File::create(p)?.set_len(size + MD_ROOM)?;
    }
    // Real data on the source: written straight to alpha's file before the pair exists;
    // the first full resync copies it onto beta.
    run.log(&format!("resync: fill {} MiB of alpha's file", size >> 20));
    run_fio(
        &run.work,
        &fio::fill_args(&Engine::File(alpha.to_string_lossy().into_owned()), size),
        FIO_SLACK + Duration::from_secs(size >> 24),
    )?;
    let disks = "file → file (one disk)";
    let pair = (alpha.as_path(), beta.as_path());
    let mut c = start_cluster(
        setup,
        tandem,
        &Spec {
            protocol: "C",
            disks: pair,
            al_extents: DEFAULT_AL,
            tag: "resync".into(),
            net: "",
        },
    )?;
    let engine = Engine::Nbd(c.uri.clone());
    let full_big = full(run, &c, "full: `invalidate`", disks, bw_mib_s)?;
    let in_sync = run.job_once("in sync", &engine, Job::RandWrite4kQd32, size, &c.pids)?;
    run.log(&format!(
        "in sync: {:.0} IOPS, p99 {:.1} µs",
        in_sync.iops, in_sync.p99_us
    ));
    let during = io_during_resync(run, &c, size)?;
    let fio_s = run.runtime_s.min(CRASH_FIO_S);
    let crash_plain = crash(
        run,
        setup,
        &mut c,
        ("crash: Primary killed under writes", "crash", disks),
        fio_s,
        bw_mib_s,
    )?;
    c.stop(setup);
    let mut c = start_cluster(
        setup,
        tandem,
        &Spec {
            protocol: "C",
            disks: pair,
            al_extents: DEFAULT_AL,
            tag: "resync-csums".into(),
            net: "csums-alg = \"crc32c\"\ncsums-after-crash-only = true\n",
        },
    )?;
    let crash_csums = crash(
        run,
        setup,
        &mut c,
        ("crash, `csums-alg = \"crc32c\"`", "crash-csums", disks),
        fio_s,
        bw_mib_s,
    )?;
    c.stop(setup);
    let notes =
        vec![
        format!(
            "The first row is the main pair of this run (protocol C, after its jobs). The others \
             use a {} MiB volume whose two replicas are files on this machine's disk under the \
             work dir (two 8 GiB replicas would not fit in RAM beside the rest): alpha's filled \
             with random data by fio before the pair was created, beta's sparse until the first \
             full resync copied alpha onto it.",
            size >> 20
        ),
        "Resync settings: tandem's defaults (c-plan-ahead 1 s, c-fill-target 32 MiB, c-max-rate \
         1200 MiB/s, c-min-rate 25 MiB/s, max-buffers 81920); no rs-discard-granularity, so the \
         SyncSource answers every request with data."
            .into(),
        format!(
            "Crash rows: fio 4K randwrite QD32 on the Primary for {} s, SIGKILL of the Primary \
             while fio runs, fio stopped, the Primary restarted with the same config (it comes \
             back Secondary and replays its activity log: al-extents {DEFAULT_AL}, at most {} MiB \
             out of sync); the time includes its start, the connect and the handshake. \
             Activity-log extents active at the kill: {} and {}. The checksum run is a fresh pair \
             (create-md, skip-initial-sync) on the same replicas with `csums-alg = \"crc32c\"` and \
             `csums-after-crash-only = true`: every out-of-sync block is read on both nodes and \
             only blocks whose crc32c differ are sent.",
            crate::report::fmt_num(fio_s),
            u64::from(DEFAULT_AL) * 4,
            crash_plain.al_active_extents.map_or("?".into(), |n| n.to_string()),
            crash_csums.al_active_extents.map_or("?".into(), |n| n.to_string()),
        ),
        "MiB/s = out-of-sync bytes / time. Data sent = the SyncSource's resync data bytes \
         (`resync_bytes_sent`). CPU = each daemon's utime+stime from /proc over the time; for a \
         crash the restarted daemon's since its start."
            .into(),
        format!(
            "IO rows: fio's 4K randwrite QD32 job over the whole {} MiB volume, protocol C. The \
             job's IO window is the last runtime seconds before fio exits; status is sampled every \
             100 ms inside it. \"Resync during the job\" = the SyncTarget's out-of-sync bytes at \
             the window's first sample minus at its last (all of them if the resync ended first), \
             over the seconds they overlapped; throttled steps = 100 ms steps in which the \
             c-min-rate check held the resync back inside the window; mean reported rate = the \
             SyncTarget's `rate_kib` averaged over the samples; resync total = invalidate until in \
             sync.",
            size >> 20
        ),
    ];
    Ok(ResyncReport {
        runs: vec![main, full_big, crash_plain, crash_csums],
        io: vec![
            ResyncIo {
                label: "in sync".into(),
                result: in_sync,
                during_resync: false,
                overlap_s: 0.0,
                resync_bytes: 0,
                resync_mib_s: 0.0,
                throttled_steps_target: 0,
                throttled_steps_source: 0,
                mean_rate_kib: 0.0,
                resync_wall_s: 0.0,
            },
            during,
        ],
        io_volume_bytes: size,
        notes,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn in_sync_needs_all_three() {
        let st = json!({"connection": "Connected", "disk": "UpToDate", "out_of_sync_bytes": 0});
        assert!(in_sync(&st));
        for (k, v) in [
            ("connection", json!("SyncTarget")),
            ("disk", json!("Inconsistent")),
            ("out_of_sync_bytes", json!(4096)),
        ] {
            let mut x = st.clone();
            x[k] = v;
            assert!(!in_sync(&x), "{x}");
        }
        assert!(!in_sync(&Value::Null));
    }

    /// A crash run whose restarted alpha (no status before) was the SyncSource: bytes and
    /// CPU are charged to the right nodes, deltas taken against beta's earlier counters.
    #[test]
    fn summarize_charges_source_and_target() {
        let alpha = json!({"node": "alpha", "size_bytes": 1u64 << 30,
            "resync_bytes_sent": 3u64 << 20, "net_tx_bytes": 4u64 << 20, "last_resync": null});
        let beta = json!({"node": "beta", "size_bytes": 1u64 << 30, "resync_bytes_sent": 7,
            "net_tx_bytes": 1u64 << 30,
            "last_resync": {"total_blocks": 2560, "same_csum_blocks": 1792, "failed_blocks": 0,
                            "active_ms": 1500}});
        let before = [
            Value::Null,
            json!({"resync_bytes_sent": 7, "net_tx_bytes": 5}),
        ];
        let r = summarize(
            &Measured {
                label: "l",
                kind: "crash",
                disks: "d",
                wall: Duration::from_secs(2),
                cpu_us: [1.5e6, 0.5e6],
                bw_mib_s: 100.0,
                al_active_extents: Some(3),
            },
            &[alpha, beta],
            1,
            &before,
        );
        assert_eq!(r.target, "beta");
        assert_eq!(r.resynced_bytes, 10 << 20);
        assert_eq!(r.same_csum_bytes, 7 << 20);
        assert_eq!(r.data_sent_bytes, 3 << 20); // alpha's, from 0
        assert_eq!(r.net_tx_bytes, 4 << 20);
        assert!((r.mib_s - 5.0).abs() < 1e-9 && (r.vs_loopback - 0.05).abs() < 1e-9);
        assert!((r.active_s - 1.5).abs() < 1e-9);
        assert!((r.source_cpu_s - 1.5).abs() < 1e-9 && (r.target_cpu_s - 0.5).abs() < 1e-9);
        assert_eq!(r.volume_bytes, 1 << 30);
    }

    #[test]
    fn sizes_and_deadlines() {
        assert_eq!(section_size(false, 1 << 30), BIG);
        assert_eq!(section_size(true, 16 << 20), 64 << 20);
        assert_eq!(section_size(true, 1 << 30), QUICK_MAX);
        assert_eq!(deadline(BIG), Duration::from_secs(120 + 512));
    }
}
