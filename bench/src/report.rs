//! The result of one end-to-end run and its three renderings: a markdown table (rows are
//! jobs, columns are targets, then the docs/design.md §11 ratios marked met / not met), JSON
//! (the same data, serde), and an SVG chart (QD1 latency percentiles and QD32 IOPS per
//! target), drawn by hand so no plotting crate is needed.
//!
//! Pure code: nothing here runs a process or touches a file, so the unit tests below build
//! a report from numbers and check every rendering.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One fio job every target runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Job {
    /// 4 KiB random write, iodepth 1: IOPS and latency percentiles.
    RandWrite4kQd1,
    /// 4 KiB random write, iodepth 32: IOPS.
    RandWrite4kQd32,
    /// 4 KiB random read, iodepth 32: IOPS.
    RandRead4kQd32,
    /// 1 MiB sequential write, iodepth 4: MiB/s.
    SeqWrite1m,
    /// 4 KiB random write, iodepth 1, a flush after every write (fio `fsync=1`).
    RandWrite4kQd1Fsync,
}

impl Job {
    /// Every job, in the order they run and are printed.
    pub const ALL: [Job; 5] = [
        Job::RandWrite4kQd1,
        Job::RandWrite4kQd32,
        Job::RandRead4kQd32,
        Job::SeqWrite1m,
        Job::RandWrite4kQd1Fsync,
    ];

    /// Short stable key (JSON, fio job name).
    pub fn key(self) -> &'static str {
        match self {
            Job::RandWrite4kQd1 => "randwrite-4k-qd1",
            Job::RandWrite4kQd32 => "randwrite-4k-qd32",
            Job::RandRead4kQd32 => "randread-4k-qd32",
            Job::SeqWrite1m => "write-1m-seq",
            Job::RandWrite4kQd1Fsync => "randwrite-4k-qd1-fsync",
        }
    }

    /// What the table calls it.
    pub fn label(self) -> &'static str {
        match self {
            Job::RandWrite4kQd1 => "4K randwrite QD1",
            Job::RandWrite4kQd32 => "4K randwrite QD32",
            Job::RandRead4kQd32 => "4K randread QD32",
            Job::SeqWrite1m => "1M seq write QD4",
            Job::RandWrite4kQd1Fsync => "4K randwrite QD1 fsync=1",
        }
    }

    /// fio arguments: (rw, bs, iodepth, fsync).
    pub fn fio_shape(self) -> (&'static str, &'static str, u32, bool) {
        match self {
            Job::RandWrite4kQd1 => ("randwrite", "4k", 1, false),
            Job::RandWrite4kQd32 => ("randwrite", "4k", 32, false),
            Job::RandRead4kQd32 => ("randread", "4k", 32, false),
            Job::SeqWrite1m => ("write", "1m", 4, false),
            Job::RandWrite4kQd1Fsync => ("randwrite", "4k", 1, true),
        }
    }

    /// The metrics the table shows for this job, one row each.
    pub fn metrics(self) -> &'static [Metric] {
        match self {
            Job::RandWrite4kQd1 | Job::RandWrite4kQd1Fsync => &[
                Metric::Iops,
                Metric::P50,
                Metric::P99,
                Metric::P999,
                Metric::CpuPerIo,
            ],
            Job::RandWrite4kQd32 | Job::RandRead4kQd32 => {
                &[Metric::Iops, Metric::P99, Metric::CpuPerIo]
            }
            Job::SeqWrite1m => &[Metric::MibPerSec, Metric::CpuPerIo],
        }
    }
}

/// One number of a job's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// IOs per second.
    Iops,
    /// MiB per second.
    MibPerSec,
    /// Median completion latency, µs.
    P50,
    /// 99th percentile latency, µs.
    P99,
    /// 99.9th percentile latency, µs.
    P999,
    /// CPU per IO, µs: fio + the server processes.
    CpuPerIo,
}

impl Metric {
    /// Row label.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Iops => "IOPS",
            Metric::MibPerSec => "MiB/s",
            Metric::P50 => "p50 µs",
            Metric::P99 => "p99 µs",
            Metric::P999 => "p99.9 µs",
            Metric::CpuPerIo => "CPU µs/IO (fio+server)",
        }
    }
}

/// What fio (and /proc for the servers) measured for one job on one target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// IOs per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency percentiles (submission to completion), µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// IOs completed.
    pub ios: u64,
    /// fio's own usr+sys CPU per IO, µs.
    pub fio_cpu_us_per_io: f64,
    /// The server processes' (nbdkit, or both tandem daemons) usr+sys CPU per IO, µs;
    /// 0 for the backing file, which has no server.
    pub server_cpu_us_per_io: f64,
}

impl JobResult {
    /// The value of `m`.
    pub fn get(&self, m: Metric) -> f64 {
        match m {
            Metric::Iops => self.iops,
            Metric::MibPerSec => self.mib_s,
            Metric::P50 => self.p50_us,
            Metric::P99 => self.p99_us,
            Metric::P999 => self.p999_us,
            Metric::CpuPerIo => self.fio_cpu_us_per_io + self.server_cpu_us_per_io,
        }
    }
}

/// One column of the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// Stable key: `file`, `nbdkit`, `standalone`, `protocol-c`, `protocol-a`, `ublk`.
    pub key: String,
    /// Column header.
    pub label: String,
    /// How it was driven (printed under the table).
    pub note: String,
    /// Why the column has no numbers, when it cannot exist on this machine (stated, never
    /// silently dropped).
    pub unavailable: Option<String>,
    /// Results in [`Job::ALL`] order, `None` only when `unavailable` is set.
    pub results: Vec<(Job, JobResult)>,
}

impl Target {
    /// This target's result for `job`.
    pub fn result(&self, job: Job) -> Option<&JobResult> {
        self.results.iter().find(|(j, _)| *j == job).map(|(_, r)| r)
    }
}

/// The limits measured in the same run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Median round trip of a 4 KiB message and a 32-byte ack over 127.0.0.1, µs.
    pub tcp_rtt_p50_us: f64,
    /// 99th percentile of the same, µs.
    pub tcp_rtt_p99_us: f64,
    /// Loopback TCP bandwidth (iperf3, one stream), MiB/s.
    pub tcp_bw_mib_s: f64,
}

/// One docs/design.md §11 target, evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    /// What is compared.
    pub name: String,
    /// The measured value (`None` when its target has no numbers).
    pub measured: Option<f64>,
    /// `"<="` or `">="`.
    pub relation: String,
    /// The bound it must meet (`None` when an input has no numbers).
    pub bound: Option<f64>,
    /// Unit of both numbers.
    pub unit: String,
    /// How the bound is made.
    pub formula: String,
    /// Whether it is met; `None` when an input is missing (e.g. no ublk).
    pub met: Option<bool>,
}

/// Where and when a run happened, and with what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// UTC date and time, `YYYY-MM-DD HH:MM:SS`.
    pub date: String,
    /// `git describe`-like commit (short hash, `-dirty` when the tree had changes).
    pub commit: String,
    /// Host name, CPU model, cores, memory, kernel.
    pub machine: String,
    /// Volume size per target, bytes.
    pub size_bytes: u64,
    /// Seconds per job.
    pub runtime_s: f64,
    /// Whether `--quick` was given.
    pub quick: bool,
    /// Tool versions (fio, nbdkit, iperf3).
    pub tools: Vec<String>,
    /// Notes on the setup (Secondary backing, nbdkit cache mode, fallbacks).
    pub notes: Vec<String>,
    /// Wall-clock seconds the whole run took.
    pub wall_s: f64,
}

/// One run of the activity-log cost: 4 KiB random writes at QD32, protocol C, over a
/// working set inside or outside the log's reach.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlCost {
    /// Row label.
    pub label: String,
    /// `al-extents` of the run.
    pub al_extents: u32,
    /// Bytes fio wrote over (from offset 0).
    pub working_set_bytes: u64,
    /// fio's numbers, with both daemons' CPU.
    pub result: JobResult,
    /// AL transactions written during the job.
    pub transactions: u64,
    /// Extents evicted during the job.
    pub evictions: u64,
}

/// One resync, timed from the command that starts it until both nodes report
/// `Connected`, `UpToDate` and 0 bytes out of sync (status polled every 50 ms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResyncRun {
    /// Row label.
    pub label: String,
    /// `full` (`invalidate` on the idle Secondary), `crash` (the Primary killed with
    /// SIGKILL under writes, then restarted) or `crash-csums` (the same with
    /// `csums-alg = "crc32c"`, `csums-after-crash-only`).
    pub kind: String,
    /// The replicated device, bytes.
    pub volume_bytes: u64,
    /// Where the two replicas are.
    pub disks: String,
    /// Seconds from the `invalidate` (full) or from the crashed Primary's restart (crash:
    /// start, activity-log replay, connect and handshake included) until in sync.
    pub wall_s: f64,
    /// The SyncTarget's own count of the run (`last_resync.active_ms`), seconds.
    pub active_s: f64,
    /// The node that was SyncTarget.
    pub target: String,
    /// Bytes out of sync when the run started (`last_resync.total_blocks` × 4096).
    pub resynced_bytes: u64,
    /// Of those, bytes found equal by checksum (`same_csum_blocks` × 4096): no data moved.
    pub same_csum_bytes: u64,
    /// Blocks that failed (`failed_blocks`); 0 on a healthy run.
    pub failed_blocks: u64,
    /// Resync data bytes the SyncSource sent (its `resync_bytes_sent`).
    pub data_sent_bytes: u64,
    /// Everything the SyncSource wrote to its sockets during the run (`net_tx_bytes`).
    pub net_tx_bytes: u64,
    /// `resynced_bytes / wall_s`, MiB/s.
    pub mib_s: f64,
    /// `mib_s` / the loopback TCP bandwidth of the same run.
    pub vs_loopback: f64,
    /// The SyncSource daemon's user+system CPU during the run, seconds.
    pub source_cpu_s: f64,
    /// The SyncTarget daemon's user+system CPU during the run, seconds.
    pub target_cpu_s: f64,
    /// Crash runs: activity-log extents active on the Primary just before the kill (each
    /// 4 MiB; the crash resync is bounded by them).
    pub al_active_extents: Option<u64>,
}

/// Application IO on the Primary while the pair is in sync, or while a full resync runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResyncIo {
    /// Row label.
    pub label: String,
    /// fio's numbers, with both daemons' CPU.
    pub result: JobResult,
    /// Whether a resync was started (`invalidate` on the Secondary) just before the job.
    pub during_resync: bool,
    /// Seconds of the job during which the resync ran (the whole job when the resync
    /// outlasted it).
    pub overlap_s: f64,
    /// Bytes the resync brought in sync during the job.
    pub resync_bytes: u64,
    /// `resync_bytes` / `overlap_s`, MiB/s.
    pub resync_mib_s: f64,
    /// Steps (100 ms each) the SyncTarget's c-min-rate check held the resync back during
    /// the job.
    pub throttled_steps_target: u64,
    /// The same on the SyncSource.
    pub throttled_steps_source: u64,
    /// The SyncTarget's reported rate (`resync.rate_kib`), mean of the samples taken
    /// during the job, KiB/s.
    pub mean_rate_kib: f64,
    /// Seconds from the `invalidate` until in sync (the whole resync, job included).
    pub resync_wall_s: f64,
}

/// The resync section (issue 5): full and crash resync times, and what a full resync
/// costs the application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResyncReport {
    /// Full and crash resyncs.
    pub runs: Vec<ResyncRun>,
    /// 4 KiB random writes at QD32 in sync and during a full resync.
    pub io: Vec<ResyncIo>,
    /// The volume of the `io` rows, bytes.
    pub io_volume_bytes: u64,
    /// How the section was set up.
    pub notes: Vec<String>,
}

/// One end-to-end run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Where and when.
    pub meta: Meta,
    /// The limits.
    pub limits: Limits,
    /// The columns.
    pub targets: Vec<Target>,
    /// The §11 ratios.
    pub ratios: Vec<Ratio>,
    /// The activity log's cost (absent in reports from before it existed).
    #[serde(default)]
    pub al_cost: Vec<AlCost>,
    /// The resync section (absent in reports from before it existed).
    #[serde(default)]
    pub resync: Option<ResyncReport>,
}

/// `x` with a sensible number of digits for a table cell.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "NaN".into();
    }
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// Evaluates the §11 ratios from the targets and limits. A ratio whose input target is
/// missing gets `met: None` and NaN numbers.
pub fn ratios(targets: &[Target], limits: &Limits) -> Vec<Ratio> {
    let get = |key: &str, job: Job, m: Metric| -> f64 {
        targets
            .iter()
            .find(|t| t.key == key)
            .and_then(|t| t.result(job))
            .map_or(f64::NAN, |r| r.get(m))
    };
    let mk = |name: &str, measured: f64, relation: &str, bound: f64, unit: &str, formula: &str| {
        let met = (measured.is_finite() && bound.is_finite()).then(|| {
            if relation == "<=" {
                measured <= bound
            } else {
                measured >= bound
            }
        });
        Ratio {
            name: name.into(),
            measured: measured.is_finite().then_some(measured),
            relation: relation.into(),
            bound: bound.is_finite().then_some(bound),
            unit: unit.into(),
            formula: formula.into(),
            met,
        }
    };
    let qd1 = Job::RandWrite4kQd1;
    let qd32 = Job::RandWrite4kQd32;
    let c_p50 = get("protocol-c", qd1, Metric::P50);
    let sa_p50 = get("standalone", qd1, Metric::P50);
    let file_p50 = get("file", qd1, Metric::P50);
    let c_iops = get("protocol-c", qd32, Metric::Iops);
    let sa_iops = get("standalone", qd32, Metric::Iops);
    let nbdkit_iops = get("nbdkit", qd32, Metric::Iops);
    let c_seq = get("protocol-c", Job::SeqWrite1m, Metric::MibPerSec);
    let file_seq = get("file", Job::SeqWrite1m, Metric::MibPerSec);
    vec![
        mk(
            "4K randwrite QD1 p50, protocol C",
            c_p50,
            "<=",
            sa_p50 + limits.tcp_rtt_p50_us + 15.0,
            "µs",
            "disconnected p50 + TCP 4 KiB RTT p50 + 15 µs",
        ),
        mk(
            "frontend overhead: 4K randwrite QD1 p50, disconnected (NBD)",
            sa_p50,
            "<=",
            file_p50 + 20.0,
            "µs",
            "backing file p50 (fio io_uring direct) + 20 µs",
        ),
        mk(
            "frontend overhead: 4K randwrite QD32 IOPS, disconnected (ublk)",
            get("ublk", qd32, Metric::Iops),
            ">=",
            0.9 * get("file", qd32, Metric::Iops),
            "IOPS",
            "0.9 × backing file IOPS",
        ),
        mk(
            "4K randwrite QD32 IOPS, protocol C vs disconnected",
            c_iops,
            ">=",
            0.8 * sa_iops,
            "IOPS",
            "0.8 × disconnected IOPS",
        ),
        mk(
            "4K randwrite QD32 IOPS, protocol C vs nbdkit",
            c_iops,
            ">=",
            nbdkit_iops,
            "IOPS",
            "1.0 × nbdkit file plugin IOPS",
        ),
        mk(
            "1M seq write MiB/s, protocol C",
            c_seq,
            ">=",
            0.85 * file_seq.min(limits.tcp_bw_mib_s),
            "MiB/s",
            "0.85 × min(backing file, loopback TCP)",
        ),
    ]
}

impl Report {
    /// The markdown rendering: header lines, the jobs × targets table, the limits, the
    /// ratios, and notes.
    pub fn to_markdown(&self) -> String {
        let m = &self.meta;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "### tandem side by side — {} — commit {}{}\n",
            m.date,
            m.commit,
            if m.quick { " (quick)" } else { "" }
        );
        let _ = writeln!(s, "Machine: {}  ", m.machine);
        let _ = writeln!(
            s,
            "Volume {} MiB per target, {} s per job, whole run {:.0} s. Tools: {}.\n",
            m.size_bytes >> 20,
            fmt_num(m.runtime_s),
            m.wall_s,
            m.tools.join(", ")
        );
        // Jobs × targets.
        let _ = write!(s, "| job | metric |");
        for t in &self.targets {
            let _ = write!(s, " {} |", t.label);
        }
        let _ = write!(s, "\n|---|---|");
        for _ in &self.targets {
            let _ = write!(s, "---:|");
        }
        s.push('\n');
        for job in Job::ALL {
            for (i, metric) in job.metrics().iter().enumerate() {
                let _ = write!(
                    s,
                    "| {} | {} |",
                    if i == 0 { job.label() } else { "" },
                    metric.label()
                );
                for t in &self.targets {
                    let cell = match (&t.unavailable, t.result(job)) {
                        (Some(why), _) => why.clone(),
                        (None, Some(r)) => cell(r, *metric),
                        (None, None) => "missing".into(),
                    };
                    let _ = write!(s, " {cell} |");
                }
                s.push('\n');
            }
        }
        let l = &self.limits;
        let _ = writeln!(
            s,
            "\nLimits, same run: TCP round trip of 4 KiB + ack over 127.0.0.1 p50 {} µs, \
             p99 {} µs; loopback TCP bandwidth {} MiB/s (iperf3, 1 stream).\n",
            fmt_num(l.tcp_rtt_p50_us),
            fmt_num(l.tcp_rtt_p99_us),
            fmt_num(l.tcp_bw_mib_s)
        );
        if !self.al_cost.is_empty() {
            let _ = writeln!(
                s,
                "Activity-log cost: 4 KiB random writes, QD32, protocol C, same daemons and \
                 disks as above, each working set filled first.\n"
            );
            let _ = writeln!(
                s,
                "| working set | al-extents (reach) | IOPS | p50 µs | p99 µs | CPU µs/IO | AL \
                 transactions | evictions |"
            );
            let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
            for a in &self.al_cost {
                let _ = writeln!(
                    s,
                    "| {} | {} ({} MiB) | {} | {} | {} | {} | {} | {} |",
                    a.label,
                    a.al_extents,
                    u64::from(a.al_extents) * 4,
                    fmt_num(a.result.iops),
                    fmt_num(a.result.p50_us),
                    fmt_num(a.result.p99_us),
                    fmt_num(a.result.fio_cpu_us_per_io + a.result.server_cpu_us_per_io),
                    a.transactions,
                    a.evictions
                );
            }
            s.push('\n');
        }
        if let Some(r) = &self.resync {
            resync_markdown(&mut s, r, self.meta.runtime_s);
        }
        let _ = writeln!(
            s,
            "| docs/design.md §11 target | measured | bound | result |"
        );
        let _ = writeln!(s, "|---|---:|---|---|");
        for r in &self.ratios {
            let verdict = match r.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "n/a",
            };
            let _ = writeln!(
                s,
                "| {} | {} {} | {} {} {} ({}) | {} |",
                r.name,
                r.measured.map_or("n/a".into(), fmt_num),
                r.unit,
                if r.relation == "<=" { "≤" } else { "≥" },
                r.bound.map_or("n/a".into(), fmt_num),
                r.unit,
                r.formula,
                verdict
            );
        }
        s.push('\n');
        for t in &self.targets {
            let _ = writeln!(s, "- **{}**: {}", t.label, t.note);
        }
        for n in &m.notes {
            let _ = writeln!(s, "- {n}");
        }
        s
    }

    /// The JSON rendering (pretty).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// An SVG chart: left, 4K randwrite QD1 latency p50 / p99 / p99.9 per target (log
    /// scale, µs); right, 4K randwrite and randread QD32 IOPS per target (linear).
    pub fn to_svg(&self) -> String {
        let measured: Vec<&Target> = self
            .targets
            .iter()
            .filter(|t| t.unavailable.is_none())
            .collect();
        let (w, h) = (960.0_f64, 420.0_f64);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 \
             {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">"
        );
        let _ = writeln!(
            s,
            r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="18" text-anchor="middle" font-size="13">{}</text>"#,
            w / 2.0,
            xml_escape(&format!(
                "tandem side by side — {} — {}",
                self.meta.commit, self.meta.date
            ))
        );
        let lat_series: [(&str, Metric, &str); 3] = [
            ("p50", Metric::P50, "#4e79a7"),
            ("p99", Metric::P99, "#f28e2b"),
            ("p99.9", Metric::P999, "#e15759"),
        ];
        let lat: Vec<Vec<f64>> = measured
            .iter()
            .map(|t| {
                lat_series
                    .iter()
                    .map(|(_, m, _)| t.result(Job::RandWrite4kQd1).map_or(0.0, |r| r.get(*m)))
                    .collect()
            })
            .collect();
        panel(
            &mut s,
            (50.0, 40.0, 420.0, 300.0),
            "4K randwrite QD1 latency (µs, log scale)",
            &measured,
            &lat_series
                .iter()
                .map(|(n, _, c)| (*n, *c))
                .collect::<Vec<_>>(),
            &lat,
            true,
        );
        let iops_series: [(&str, Job, &str); 2] = [
            ("randwrite QD32", Job::RandWrite4kQd32, "#59a14f"),
            ("randread QD32", Job::RandRead4kQd32, "#b07aa1"),
        ];
        let iops: Vec<Vec<f64>> = measured
            .iter()
            .map(|t| {
                iops_series
                    .iter()
                    .map(|(_, j, _)| t.result(*j).map_or(0.0, |r| r.iops))
                    .collect()
            })
            .collect();
        panel(
            &mut s,
            (530.0, 40.0, 400.0, 300.0),
            "4K IOPS",
            &measured,
            &iops_series
                .iter()
                .map(|(n, _, c)| (*n, *c))
                .collect::<Vec<_>>(),
            &iops,
            false,
        );
        s.push_str("</svg>\n");
        s
    }
}

/// The resync section: one table of resync runs, one of application IO during a resync.
fn resync_markdown(s: &mut String, r: &ResyncReport, runtime_s: f64) {
    let mib = |b: u64| fmt_num(b as f64 / f64::from(1u32 << 20));
    let _ = writeln!(
        s,
        "Resync (issue 5), tandem's default rate controller. Time: from the command \
         (`invalidate` on the Secondary; for a crash, the killed Primary's restart) until both \
         nodes report Connected, UpToDate, 0 bytes out of sync.\n"
    );
    let _ = writeln!(
        s,
        "| resync | volume | replicas | time s | active s | out of sync MiB | MiB/s | × loopback | \
         data sent MiB | equal by csum MiB | CPU s source + target |"
    );
    let _ = writeln!(s, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for x in &r.runs {
        let _ = writeln!(
            s,
            "| {} | {} MiB | {} | {} | {} | {} | {} | {} | {} | {} | {} + {} |",
            x.label,
            mib(x.volume_bytes),
            x.disks,
            fmt_num(x.wall_s),
            fmt_num(x.active_s),
            mib(x.resynced_bytes),
            fmt_num(x.mib_s),
            fmt_num(x.vs_loopback),
            mib(x.data_sent_bytes),
            mib(x.same_csum_bytes),
            fmt_num(x.source_cpu_s),
            fmt_num(x.target_cpu_s)
        );
    }
    if !r.io.is_empty() {
        let _ = writeln!(
            s,
            "\nApplication IO during a full resync: 4K randwrite QD32 on the Primary over the \
             {} MiB volume, {} s, started right after the `invalidate`.\n",
            r.io_volume_bytes >> 20,
            fmt_num(runtime_s)
        );
        let _ = writeln!(
            s,
            "| while | IOPS | p50 µs | p99 µs | p99.9 µs | CPU µs/IO | resync during the job | \
             resync MiB/s during the job | mean reported rate MiB/s | throttled steps target / \
             source | resync total s |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for x in &r.io {
            let res = &x.result;
            let _ = write!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                x.label,
                fmt_num(res.iops),
                fmt_num(res.p50_us),
                fmt_num(res.p99_us),
                fmt_num(res.p999_us),
                fmt_num(res.fio_cpu_us_per_io + res.server_cpu_us_per_io)
            );
            if x.during_resync {
                let _ = writeln!(
                    s,
                    " {} MiB in {} s | {} | {} | {} / {} | {} |",
                    mib(x.resync_bytes),
                    fmt_num(x.overlap_s),
                    fmt_num(x.resync_mib_s),
                    fmt_num(x.mean_rate_kib / 1024.0),
                    x.throttled_steps_target,
                    x.throttled_steps_source,
                    fmt_num(x.resync_wall_s)
                );
            } else {
                let _ = writeln!(s, " – | – | – | – | – |");
            }
        }
    }
    s.push('\n');
    for n in &r.notes {
        let _ = writeln!(s, "- {n}");
    }
    if !r.notes.is_empty() {
        s.push('\n');
    }
}

/// One table cell.
fn cell(r: &JobResult, m: Metric) -> String {
    if m == Metric::CpuPerIo {
        format!(
            "{} ({}+{})",
            fmt_num(r.get(m)),
            fmt_num(r.fio_cpu_us_per_io),
            fmt_num(r.server_cpu_us_per_io)
        )
    } else {
        fmt_num(r.get(m))
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Grouped bars: one group per target, one bar per series. `frame` is (x, y, width,
/// height) of the plot area; `values[target][series]`.
fn panel(
    s: &mut String,
    frame: (f64, f64, f64, f64),
    title: &str,
    targets: &[&Target],
    series: &[(&str, &str)],
    values: &[Vec<f64>],
    log: bool,
) {
    let (x0, y0, pw, ph) = frame;
    let top = y0 + 20.0;
    let plot_h = ph - 20.0;
    let base = top + plot_h;
    let max = values
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(1.0);
    // Log scale from 1 to the next power of ten above max; linear from 0 to a round
    // number (1, 2 or 5 × 10^k per gridline, four or five gridlines) above max.
    let log_top = max.log10().ceil().max(1.0);
    let step = {
        let raw = max * 1.05 / 4.0;
        let mag = 10f64.powf(raw.log10().floor());
        [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|v| *v >= raw)
            .unwrap_or(10.0 * mag)
    };
    let lin_top = (max * 1.05 / step).ceil() * step;
    let scale = |v: f64| -> f64 {
        if !v.is_finite() || v <= 0.0 {
            return 0.0;
        }
        if log {
            (v.max(1.0).log10() / log_top) * plot_h
        } else {
            v / lin_top * plot_h
        }
    };
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="12">{}</text>"#,
        x0 + pw / 2.0,
        y0 + 10.0,
        xml_escape(title)
    );
    // Axes and grid.
    let _ = writeln!(
        s,
        "<line x1=\"{x0}\" y1=\"{top}\" x2=\"{x0}\" y2=\"{base}\" stroke=\"#333\"/><line \
         x1=\"{x0}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"#333\"/>",
        x0 + pw
    );
    let ticks: Vec<f64> = if log {
        std::iter::successors(Some(1.0_f64), |v| Some(v * 10.0))
            .take_while(|v| v.log10() <= log_top + 0.001)
            .collect()
    } else {
        std::iter::successors(Some(0.0_f64), |v| Some(v + step))
            .take_while(|v| *v <= lin_top + step / 2.0)
            .collect()
    };
    for t in ticks {
        let y = base - scale(t).max(0.0);
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text \
             x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            x0 + pw,
            x0 - 4.0,
            y + 4.0,
            fmt_num(t)
        );
    }
    let groups = targets.len().max(1) as f64;
    let group_w = pw / groups;
    let bar_w = (group_w * 0.8) / series.len().max(1) as f64;
    for (ti, t) in targets.iter().enumerate() {
        let gx = x0 + group_w * ti as f64 + group_w * 0.1;
        for (si, (name, color)) in series.iter().enumerate() {
            let v = values
                .get(ti)
                .and_then(|row| row.get(si))
                .copied()
                .unwrap_or(0.0);
            let bh = scale(v);
            let x = gx + bar_w * si as f64;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" \
                 fill=\"{color}\"><title>{}: {} {}</title></rect>",
                base - bh,
                bar_w - 1.0,
                xml_escape(&t.label),
                name,
                fmt_num(v)
            );
        }
        // The first word on one line, the rest below, so neighbours do not overlap.
        let (first, rest) = t.label.split_once(' ').unwrap_or((t.label.as_str(), ""));
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}<tspan x=\"{:.1}\" \
             dy=\"12\">{}</tspan></text>",
            gx + group_w * 0.4,
            base + 14.0,
            xml_escape(first),
            gx + group_w * 0.4,
            xml_escape(rest)
        );
    }
    // Legend.
    for (si, (name, color)) in series.iter().enumerate() {
        let lx = x0 + 10.0 + 110.0 * si as f64;
        let ly = base + 44.0;
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" \
             y=\"{ly}\">{name}</text>",
            ly - 9.0,
            lx + 14.0
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn result(scale: f64) -> JobResult {
        JobResult {
            iops: 10_000.0 * scale,
            mib_s: 500.0 * scale,
            p50_us: 50.0 / scale,
            p99_us: 120.0 / scale,
            p999_us: 400.0 / scale,
            ios: 1000,
            fio_cpu_us_per_io: 5.0,
            server_cpu_us_per_io: 7.5,
        }
    }

    fn target(key: &str, scale: f64) -> Target {
        Target {
            key: key.into(),
            label: format!("col {key}"),
            note: format!("how {key}"),
            unavailable: None,
            results: Job::ALL.iter().map(|j| (*j, result(scale))).collect(),
        }
    }

    fn report() -> Report {
        let mut targets = vec![
            target("file", 2.0),
            target("nbdkit", 1.0),
            target("standalone", 1.0),
            target("protocol-c", 0.5),
            target("protocol-a", 0.9),
        ];
        targets.push(Target {
            key: "ublk".into(),
            label: "tandem ublk".into(),
            note: "needs ublk_drv".into(),
            unavailable: Some("n/a (no ublk_drv)".into()),
            results: vec![],
        });
        let limits = Limits {
            tcp_rtt_p50_us: 30.0,
            tcp_rtt_p99_us: 60.0,
            tcp_bw_mib_s: 3000.0,
        };
        Report {
            meta: Meta {
                date: "2025-01-02 03:04:05".into(),
                commit: "abc1234".into(),
                machine: "test <host>".into(),
                size_bytes: 64 << 20,
                runtime_s: 2.0,
                quick: true,
                tools: vec!["fio-3.33".into()],
                notes: vec!["a note".into()],
                wall_s: 10.0,
            },
            ratios: ratios(&targets, &limits),
            limits,
            targets,
            al_cost: vec![],
            resync: Some(resync_section()),
        }
    }

    fn resync_run(kind: &str, resynced: u64, sent: u64) -> ResyncRun {
        ResyncRun {
            label: format!("{kind} row"),
            kind: kind.into(),
            volume_bytes: 8 << 30,
            disks: "file → file".into(),
            wall_s: 16.0,
            active_s: 15.5,
            target: "beta".into(),
            resynced_bytes: resynced,
            same_csum_bytes: resynced - sent,
            failed_blocks: 0,
            data_sent_bytes: sent,
            net_tx_bytes: sent + 4096,
            mib_s: resynced as f64 / 1_048_576.0 / 16.0,
            vs_loopback: 0.25,
            source_cpu_s: 3.5,
            target_cpu_s: 4.25,
            al_active_extents: (kind != "full").then_some(1237),
        }
    }

    fn resync_section() -> ResyncReport {
        let io = |during: bool| ResyncIo {
            label: if during { "resyncing" } else { "in sync" }.into(),
            result: result(if during { 0.5 } else { 1.0 }),
            during_resync: during,
            overlap_s: if during { 2.0 } else { 0.0 },
            resync_bytes: if during { 50 << 20 } else { 0 },
            resync_mib_s: if during { 25.0 } else { 0.0 },
            throttled_steps_target: if during { 17 } else { 0 },
            throttled_steps_source: if during { 3 } else { 0 },
            mean_rate_kib: if during { 30_720.0 } else { 0.0 },
            resync_wall_s: if during { 30.0 } else { 0.0 },
        };
        ResyncReport {
            runs: vec![
                resync_run("full", 8 << 30, 8 << 30),
                resync_run("crash-csums", 4948 << 20, 1 << 20),
            ],
            io: vec![io(false), io(true)],
            io_volume_bytes: 8 << 30,
            notes: vec!["resync note".into()],
        }
    }

    #[test]
    fn ratios_follow_design_section_11() {
        let r = report();
        let by = |p: &str| r.ratios.iter().find(|x| x.name.starts_with(p)).unwrap();
        // C p50 = 100; bound = standalone 50 + RTT 30 + 15 = 95 → not met.
        let c = by("4K randwrite QD1 p50, protocol C");
        assert_eq!(
            (c.measured, c.bound, c.met),
            (Some(100.0), Some(95.0), Some(false))
        );
        // Frontend: standalone 50 ≤ file 25 + 20 = 45 → not met.
        let f = by("frontend overhead: 4K randwrite QD1");
        assert_eq!((f.bound, f.met), (Some(45.0), Some(false)));
        // ublk has no numbers: stated, not met/unmet.
        assert_eq!(by("frontend overhead: 4K randwrite QD32").met, None);
        // C 5000 IOPS vs 0.8 × 10000 → not met; vs nbdkit 10000 → not met.
        assert_eq!(
            by("4K randwrite QD32 IOPS, protocol C vs disc").met,
            Some(false)
        );
        // Seq: C 250 ≥ 0.85 × min(1000, 3000) = 850 → not met.
        let s = by("1M seq");
        assert_eq!((s.bound, s.met), (Some(850.0), Some(false)));
        // And a case that is met.
        let mut t = r.targets.clone();
        t[3] = target("protocol-c", 3.0);
        let ok = ratios(&t, &r.limits);
        assert_eq!(ok[0].met, Some(true));
        assert_eq!(ok[3].met, Some(true));
    }

    #[test]
    fn markdown_has_a_number_in_every_measured_cell() {
        let r = report();
        let md = r.to_markdown();
        let rows: Vec<&str> = md
            .lines()
            .skip_while(|l| !l.starts_with("| job"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .collect();
        let metric_rows: usize = Job::ALL.iter().map(|j| j.metrics().len()).sum();
        assert_eq!(rows.len(), metric_rows, "{md}");
        for row in rows {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            // "", job, metric, 6 targets, "".
            assert_eq!(cells.len(), 2 + 2 + 6, "{row}");
            for c in &cells[3..8] {
                let first = c.split_whitespace().next().unwrap();
                assert!(first.parse::<f64>().is_ok(), "cell {c:?} in {row}");
            }
            assert_eq!(cells[8], "n/a (no ublk_drv)");
        }
        assert!(md.contains("| 1M seq write MiB/s, protocol C | 250 MiB/s"));
        assert!(md.contains("**not met**"));
        assert!(md.contains("CPU µs/IO (fio+server) | 12.5 (5.00+7.50)"));
    }

    #[test]
    fn markdown_has_the_resync_tables() {
        let md = report().to_markdown();
        // Full row: 8192 MiB in 16 s = 512 MiB/s, everything sent, nothing equal by csum.
        assert!(
            md.contains(
                "| full row | 8192 MiB | file → file | 16.0 | 15.5 | 8192 | 512 | 0.25 | \
                 8192 | 0.00 | 3.50 + 4.25 |"
            ),
            "{md}"
        );
        // Checksum row: 1 MiB sent, the rest equal by checksum.
        assert!(
            md.contains(
                "| crash-csums row | 8192 MiB | file → file | 16.0 | 15.5 | 4948 | 309 | 0.25 | \
                 1.00 | 4947 |"
            ),
            "{md}"
        );
        // IO rows: in sync has dashes, the resync row its numbers.
        assert!(
            md.contains("| in sync | 10000 | 50.0 | 120 | 400 | 12.5 | – | – | – | – | – |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| resyncing | 5000 | 100 | 240 | 800 | 12.5 | 50.0 MiB in 2.00 s | 25.0 | 30.0 | \
                 17 / 3 | 30.0 |"
            ),
            "{md}"
        );
        assert!(md.contains("over the 8192 MiB volume, 2.00 s"), "{md}");
        assert!(md.contains("- resync note"), "{md}");
        // The section sits before the §11 table, which still renders.
        let at = |needle: &str| md.find(needle).unwrap();
        assert!(at("| resync | volume") < at("| docs/design.md §11 target"));
        // No section without data.
        let mut r = report();
        r.resync = None;
        assert!(!r.to_markdown().contains("| resync | volume"));
    }

    #[test]
    fn json_without_a_resync_section_still_parses() {
        let mut v: serde_json::Value = serde_json::from_str(&report().to_json()).unwrap();
        v.as_object_mut().unwrap().remove("resync");
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back.resync, None);
    }

    #[test]
    fn json_round_trips() {
        let r = report();
        let back: Report = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn svg_has_one_bar_per_target_and_series_and_escapes_text() {
        let r = report();
        let svg = r.to_svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // 5 measured targets × (3 latency + 2 IOPS) bars, each with a <title>.
        assert_eq!(svg.matches("<title>").count(), 5 * 5);
        assert_eq!(svg.matches("<svg").count(), 1);
        assert!(svg.contains("col protocol-c"));
        assert!(
            !svg.contains("tandem ublk"),
            "unavailable column is not drawn"
        );
        // Bars are non-negative and inside the canvas.
        for part in svg.split("height=\"").skip(2) {
            let v: f64 = part.split('"').next().unwrap().parse().unwrap();
            assert!((0.0..=420.0).contains(&v), "{v}");
        }
    }

    #[test]
    fn numbers_format_for_tables() {
        assert_eq!(fmt_num(12345.6), "12346");
        assert_eq!(fmt_num(45.67), "45.7");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(f64::NAN), "NaN");
    }
}
