//! fio command lines for the benchmark jobs and parsing of fio's JSON output.
//!
//! Every target runs the same jobs with the same options; only the engine differs:
//! `io_uring` + `direct=1` on the backing file, `nbd` (libnbd) on an NBD Unix socket.
//! Latency is fio's `lat` (submission to completion) at the 50 / 99 / 99.9 percentiles.

use crate::report::{Job, JobResult};
use anyhow::{anyhow, bail, Context};
use serde_json::Value;

/// How fio reaches a target.
#[derive(Debug, Clone)]
pub enum Engine {
    /// `ioengine=io_uring`, `direct=1` on this file or block device.
    File(String),
    /// `ioengine=nbd` on this URI (`nbd+unix:///?socket=...`).
    Nbd(String),
}

/// fio arguments (without the program name) for `job` on `engine`: `size` bytes,
/// time-based for `runtime_s` seconds, JSON on stdout.
pub fn job_args(engine: &Engine, job: Job, size: u64, runtime_s: f64) -> Vec<String> {
    let (rw, bs, depth, fsync) = job.fio_shape();
    let mut a = common(engine, job.key(), size);
    a.extend([
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        format!("--iodepth={depth}"),
        "--time_based=1".into(),
        format!("--runtime={}ms", ms(runtime_s)),
        "--lat_percentiles=1".into(),
        "--clat_percentiles=0".into(),
        "--percentile_list=50:99:99.9".into(),
        "--norandommap=1".into(),
        "--randrepeat=0".into(),
    ]);
    if fsync {
        a.push("--fsync=1".into());
    }
    a
}

/// fio arguments that write the whole target once, sequentially in 1 MiB blocks, so no
/// measured job is the first write to a block.
pub fn fill_args(engine: &Engine, size: u64) -> Vec<String> {
    let mut a = common(engine, "fill", size);
    a.extend([
        "--rw=write".into(),
        "--bs=1m".into(),
        "--iodepth=8".into(),
        // Random data, so a compressing or deduplicating layer would not flatter anyone.
        "--refill_buffers=1".into(),
    ]);
    a
}

fn ms(s: f64) -> u64 {
    let v = (s * 1000.0).round();
    if v.is_finite() && v >= 1.0 {
        // Bounded by the check above and by u64's range for any sane runtime.
        format!("{v:.0}").parse().unwrap_or(1000)
    } else {
        1
    }
}

fn common(engine: &Engine, name: &str, size: u64) -> Vec<String> {
    let mut a = vec![
        format!("--name={name}"),
        format!("--size={size}"),
        "--output-format=json".into(),
        "--group_reporting=1".into(),
        "--numjobs=1".into(),
    ];
    match engine {
        Engine::File(path) => a.extend([
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            format!("--filename={path}"),
        ]),
        Engine::Nbd(uri) => a.extend(["--ioengine=nbd".into(), format!("--uri={uri}")]),
    }
    a
}

/// What one fio run reports, before the server CPU is added.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FioRun {
    /// The job's numbers (server CPU left at 0).
    pub result: JobResult,
    /// The job's runtime as fio measured it, ms.
    pub runtime_ms: f64,
}

fn num(v: &Value, path: &[&str]) -> anyhow::Result<f64> {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .ok_or_else(|| anyhow!("fio JSON has no `{}`", path.join(".")))?;
    }
    cur.as_f64()
        .ok_or_else(|| anyhow!("fio JSON `{}` is not a number: {cur}", path.join(".")))
}

/// Parses fio's `--output-format=json` for a single-job run of `job`. fio may print
/// warnings before the JSON; everything before the first `{` is skipped.
pub fn parse(output: &str, job: Job) -> anyhow::Result<FioRun> {
    let start = output
        .find('{')
        .ok_or_else(|| anyhow!("fio printed no JSON: {output:.400}"))?;
    let v: Value = serde_json::from_str(&output[start..]).context("fio JSON")?;
    let j = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or_else(|| anyhow!("fio JSON has no jobs"))?;
    if let Some(err) = j.get("error").and_then(Value::as_i64) {
        if err != 0 {
            bail!("fio job failed with error {err}");
        }
    }
    let dir = if job.fio_shape().0.contains("read") {
        "read"
    } else {
        "write"
    };
    let d = j
        .get(dir)
        .ok_or_else(|| anyhow!("fio JSON has no `{dir}`"))?;
    let ios = num(d, &["total_ios"])?;
    if ios < 1.0 {
        bail!("fio completed no {dir} IOs");
    }
    let runtime_ms = num(j, &["job_runtime"])?;
    let cpu = num(j, &["usr_cpu"])? + num(j, &["sys_cpu"])?;
    let pct = |p: &str| -> anyhow::Result<f64> {
        Ok(num(d, &["lat_ns", "percentile", p])
            .or_else(|_| num(d, &["clat_ns", "percentile", p]))?
            / 1000.0)
    };
    let ios_u = format!("{ios:.0}").parse::<u64>().unwrap_or(0);
    Ok(FioRun {
        result: JobResult {
            iops: num(d, &["iops"])?,
            mib_s: num(d, &["bw_bytes"])? / f64::from(1u32 << 20),
            p50_us: pct("50.000000")?,
            p99_us: pct("99.000000")?,
            p999_us: pct("99.900000")?,
            ios: ios_u,
            // usr+sys is a percentage of one CPU over the job's runtime.
            fio_cpu_us_per_io: cpu / 100.0 * runtime_ms * 1000.0 / ios,
            server_cpu_us_per_io: 0.0,
        },
        runtime_ms,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "randwrite-4k-qd1",
      "error" : 0,
      "job_runtime" : 2000,
      "usr_cpu" : 10.0,
      "sys_cpu" : 15.0,
      "read" : { "total_ios" : 0, "iops" : 0.0, "bw_bytes" : 0 },
      "write" : {
        "total_ios" : 20000,
        "iops" : 10000.0,
        "bw_bytes" : 40960000,
        "lat_ns" : {
          "percentile" : { "50.000000" : 45056, "99.000000" : 90112, "99.900000" : 250880 }
        }
      }
    }
  ]
}"#;

    #[test]
    fn parses_lat_percentiles_and_cpu_per_io() {
        let r = parse(SAMPLE, Job::RandWrite4kQd1).unwrap();
        assert_eq!(r.runtime_ms, 2000.0);
        assert_eq!(r.result.ios, 20000);
        assert!((r.result.p50_us - 45.056).abs() < 1e-9);
        assert!((r.result.p999_us - 250.88).abs() < 1e-9);
        // 25% of a CPU for 2 s = 0.5 s over 20000 IOs = 25 µs/IO.
        assert!((r.result.fio_cpu_us_per_io - 25.0).abs() < 1e-9);
        assert!((r.result.mib_s - 39.0625).abs() < 1e-9);
    }

    #[test]
    fn a_read_job_without_reads_is_an_error() {
        let e = parse(SAMPLE, Job::RandRead4kQd32).unwrap_err();
        assert!(e.to_string().contains("no read IOs"), "{e}");
        assert!(parse("fio: engine nbd not loadable", Job::RandWrite4kQd1).is_err());
    }

    #[test]
    fn job_args_pick_the_engine_and_shape() {
        let a = job_args(
            &Engine::Nbd("nbd+unix:///?socket=/x".into()),
            Job::RandWrite4kQd1Fsync,
            1 << 20,
            1.5,
        );
        for want in [
            "--ioengine=nbd",
            "--uri=nbd+unix:///?socket=/x",
            "--rw=randwrite",
            "--iodepth=1",
            "--fsync=1",
            "--runtime=1500ms",
            "--size=1048576",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} in {a:?}");
        }
        let f = fill_args(&Engine::File("/dev/x".into()), 4096);
        assert!(f.iter().any(|x| x == "--direct=1"));
        assert!(f.iter().any(|x| x == "--rw=write"));
    }
}
