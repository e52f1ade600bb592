//! The end-to-end benchmark runner (`bench/`, issue 3) in quick mode with tiny sizes: every
//! target column that can exist on this machine must come back with numbers in every row,
//! the results must be written as markdown, JSON and SVG, and the run must clean up its
//! loop device and tmpfs. No assertion on the values: they depend on the machine.

use std::path::Path;
use tandem_bench::e2e::{self, Opts};
use tandem_bench::report::{Job, Metric, Report};
use tandem_tests::{tandem_bin, TempDir};

#[test]
fn quick_run_fills_every_column_with_numbers() {
    let dir = TempDir::new("bench-quick");
    let work = dir.path().join("work");
    let out = dir.path().join("results");
    let opts = Opts {
        quick: true,
        size: Some("16MiB".into()),
        runtime: Some(1.0),
        probe_time: Some(1),
        work_dir: work.clone(),
        out_dir: out.clone(),
        tandem: Some(tandem_bin().to_path_buf()),
        no_install: false,
        render: None,
    };
    let report = e2e::run(&opts).expect("e2e --quick run");
    let md_path = e2e::write(&report, &out).expect("write results");

    // Every available column has a finite number for every metric of every job.
    let expected = ["file", "nbdkit", "standalone", "protocol-c", "protocol-a"];
    for key in expected {
        let t = report
            .targets
            .iter()
            .find(|t| t.key == key)
            .unwrap_or_else(|| panic!("no column {key}"));
        assert!(t.unavailable.is_none(), "{key}: {:?}", t.unavailable);
        for job in Job::ALL {
            let r = t
                .result(job)
                .unwrap_or_else(|| panic!("{key}: no result for {}", job.label()));
            for m in job.metrics() {
                let v = r.get(*m);
                assert!(
                    v.is_finite() && v >= 0.0,
                    "{key} {} {m:?} = {v}",
                    job.label()
                );
                if matches!(m, Metric::Iops | Metric::MibPerSec) {
                    assert!(v > 0.0, "{key} {} {m:?} = {v}", job.label());
                }
            }
        }
    }
    // The column that cannot exist here says why, in the table too.
    let ublk = report
        .targets
        .iter()
        .find(|t| t.key == "ublk")
        .expect("ublk column");
    let why = ublk
        .unavailable
        .as_deref()
        .expect("ublk column states why it is empty");
    assert!(why.starts_with("n/a ("), "{why}");
    assert!(report.limits.tcp_rtt_p50_us > 0.0 && report.limits.tcp_bw_mib_s > 0.0);
    // Every ratio whose inputs exist is decided.
    for r in &report.ratios {
        if !r.name.contains("ublk") {
            assert!(r.met.is_some(), "{} undecided", r.name);
        }
    }

    // The markdown table: every measured cell starts with a number.
    let md = std::fs::read_to_string(&md_path).expect("read markdown");
    let rows: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("| job"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(!rows.is_empty(), "{md}");
    for row in rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        for c in &cells[3..3 + expected.len()] {
            let first = c.split_whitespace().next().unwrap_or("");
            assert!(first.parse::<f64>().is_ok(), "cell {c:?} in {row}");
        }
    }
    // JSON and SVG beside it.
    let stem = md_path.with_extension("");
    let json = std::fs::read_to_string(stem.with_extension("json")).expect("json");
    let back: Report = serde_json::from_str(&json).expect("json parses as a Report");
    assert_eq!(back.targets.len(), report.targets.len());
    let svg = std::fs::read_to_string(stem.with_extension("svg")).expect("svg");
    assert!(svg.starts_with("<svg") && svg.contains("</svg>"));

    // Cleanup: nothing of the run is left mounted or attached.
    let ram = work.join("ram");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    assert!(
        !mounts.contains(&*ram.to_string_lossy()),
        "tmpfs {} still mounted",
        ram.display()
    );
    let loops = std::process::Command::new("losetup")
        .arg("-j")
        .arg(ram.join("secondary.img"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(loops.trim().is_empty(), "loop device left: {loops}");
    assert!(Path::new(&md_path).is_file());
}
