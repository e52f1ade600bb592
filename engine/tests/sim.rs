//! The seeded simulator over many seeds (docs/design.md §10): a Primary and a Secondary core
//! with faulty disks and networks; see `tandem_engine::sim` for what is checked.
//!
//! `TANDEM_SIM_SEED=<n>` replays exactly one seed; `TANDEM_SIM_SEEDS=<count>` runs seeds
//! `0..count` (default 300). A failing seed is printed with its parameters.

use tandem_engine::sim::{run, SimReport};
use tandem_engine::state::Protocol;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")),
    )
}

#[test]
fn seeds_pass_every_checker() {
    if let Some(seed) = env_u64("TANDEM_SIM_SEED") {
        match run(seed) {
            Ok(r) => eprintln!("seed {seed} passed: {r:?}"),
            Err(f) => panic!("{f}"),
        }
        return;
    }
    let count = env_u64("TANDEM_SIM_SEEDS").unwrap_or(300);
    let mut failures = Vec::new();
    let mut reports: Vec<SimReport> = Vec::new();
    for seed in 0..count {
        match run(seed) {
            Ok(r) => reports.push(r),
            Err(f) => {
                eprintln!("{f}");
                failures.push(f.seed);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed: {failures:?} (replay one with TANDEM_SIM_SEED=<seed>)",
        failures.len()
    );
    if count < 100 {
        return; // too few seeds for the coverage assertions below
    }
    for p in [Protocol::A, Protocol::B, Protocol::C] {
        assert!(
            reports.iter().any(|r| r.protocol == Some(p)),
            "no seed ran protocol {p}"
        );
    }
    assert_coverage(&reports, count);
    // Some runs must end fully in sync, or checker 3 never compares anything.
    assert!(reports
        .iter()
        .any(|r| r.out_of_sync_bytes == 0 && r.writes_ok > 0));
}

/// The runs must have exercised what the checkers are about; a simulator that never
/// drops a connection, never overlaps writes, never evicts an activity-log extent or
/// never crashes with a difference only the log knows of would pass vacuously.
fn assert_coverage(reports: &[SimReport], count: u64) {
    let sum = |f: fn(&SimReport) -> u64| reports.iter().map(f).sum::<u64>();
    let coverage = [
        ("connection drops", sum(|r| r.drops)),
        (
            "drops asked for by the secondary",
            sum(|r| r.secondary_drops),
        ),
        ("writes waiting on an overlap", sum(|r| r.overlap_waits)),
        ("secondary writes held (drain)", sum(|r| r.writes_held)),
        ("busy refusals", sum(|r| r.busy)),
        ("failed writes", sum(|r| r.writes_failed)),
        ("failed flushes", sum(|r| r.flushes_failed)),
        (
            "flushes that waited for the peer",
            sum(|r| r.flushes_waited_for_peer),
        ),
        ("successful flushes", sum(|r| r.flushes_ok)),
        ("barrier acks", sum(|r| r.barrier_acks)),
        ("out-of-sync bytes", sum(|r| r.out_of_sync_bytes)),
        ("activity-log evictions", sum(|r| r.al.evictions)),
        ("failed metadata writes", sum(|r| r.meta_writes_failed)),
        (
            "writes failed by their AL transaction",
            sum(|r| r.writes_failed_by_al),
        ),
        ("primary crashes", sum(|r| r.crashes)),
        ("requests lost in a crash", sum(|r| r.lost_ops)),
        (
            "blocks differing after a restart",
            sum(|r| r.crash_diff_blocks),
        ),
        (
            "of those, covered only by the activity log",
            sum(|r| r.al_only_blocks),
        ),
        ("resyncs", sum(|r| r.resyncs)),
        ("resyncs finished", sum(|r| r.resyncs_done)),
        ("resync replies voided by a write", sum(|r| r.void_replies)),
        (
            "writes held behind a resync write",
            sum(|r| r.held_by_resync),
        ),
        ("split brains", sum(|r| r.split_brains)),
        ("split brains refused", sum(|r| r.sb_refused)),
        (
            "split brains resolved by a policy",
            sum(|r| r.sb_auto_resolved),
        ),
        ("secondary disks detached", sum(|r| r.s_detaches)),
        ("detached secondaries re-attached", sum(|r| r.s_reattaches)),
        (
            "failovers promoting the secondary",
            sum(|r| r.failover_promoted),
        ),
        (
            "failovers refused: secondary Failed",
            sum(|r| r.failover_refused_failed),
        ),
        (
            "failovers refused: secondary not UpToDate",
            sum(|r| r.failover_refused_inconsistent),
        ),
        (
            "failovers refused: secondary disconnected",
            sum(|r| r.failover_refused_disconnected),
        ),
        ("crossing promotion requests", sum(|r| r.race_crossing)),
        (
            "promotion requests refused as concurrent",
            sum(|r| r.race_concurrent_refusals),
        ),
        (
            "promotion requests lost with the connection",
            sum(|r| r.race_dropped),
        ),
        ("switchovers", sum(|r| r.switchovers)),
        ("secondary stops", sum(|r| r.s_stops)),
        ("secondary power losses", sum(|r| r.s_power_losses)),
        ("invalidates", sum(|r| r.invalidates)),
    ];
    let seeds = |f: fn(&SimReport) -> bool| reports.iter().filter(|r| f(r)).count();
    eprintln!(
        "coverage over {count} seeds: {coverage:?}; seeds that evict: {}, that crash: {}; \
         failovers that would have lost acknowledged writes if the disconnected secondary \
         had been promoted (no fencing): {}",
        seeds(|r| r.al.evictions > 0),
        seeds(|r| r.crashes > 0),
        sum(|r| r.failover_stale_if_promoted)
    );
    assert_eq!(
        sum(|r| r.failovers),
        count,
        "every seed ends with a failover"
    );
    for (what, n) in coverage {
        assert!(n > 0, "no seed exercised {what}");
    }
}
