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

/// One counter of a seed's report.
type Counter = fn(&SimReport) -> u64;

/// The runs must have exercised what the checkers are about; a simulator that never
/// drops a connection, never overlaps writes, never evicts an activity-log extent or
/// never crashes with a difference only the log knows of would pass vacuously.
fn assert_coverage(reports: &[SimReport], count: u64) {
    let sum = |f: fn(&SimReport) -> u64| reports.iter().map(f).sum::<u64>();
    let counters: &[(&str, Counter)] = &[
        ("connection drops", |r| r.drops),
        ("drops asked for by a node", |r| r.node_drops),
        ("writes waiting on an overlap", |r| r.overlap_waits),
        ("secondary writes held (drain)", |r| r.writes_held),
        ("writes applied after their connection's loss", |r| {
            r.writes_after_loss
        }),
        ("busy refusals", |r| r.busy),
        ("failed writes", |r| r.writes_failed),
        ("failed flushes", |r| r.flushes_failed),
        ("flushes that waited for the peer", |r| {
            r.flushes_waited_for_peer
        }),
        ("successful flushes", |r| r.flushes_ok),
        ("barrier acks", |r| r.barrier_acks),
        ("out-of-sync bytes", |r| r.out_of_sync_bytes),
        ("activity-log evictions", |r| r.al.evictions),
        ("failed metadata writes", |r| r.meta_writes_failed),
        ("writes failed by their AL transaction", |r| {
            r.writes_failed_by_al
        }),
        ("primary crashes", |r| r.crashes),
        ("requests lost in a crash", |r| r.lost_ops),
        ("blocks differing after a restart", |r| r.crash_diff_blocks),
        ("of those, covered only by the activity log", |r| {
            r.al_only_blocks
        }),
        ("resyncs", |r| r.resyncs),
        ("resyncs finished", |r| r.resyncs_done),
        ("blocks written while the bitmaps crossed, told", |r| {
            r.exchange_told
        }),
        ("source runs a failed target disk ended", |r| {
            r.source_ends_incomplete
        }),
        ("resync replies voided by a write", |r| r.void_replies),
        ("writes held behind a resync write", |r| r.held_by_resync),
        ("split brains", |r| r.split_brains),
        ("split brains refused", |r| r.sb_refused),
        ("split brains resolved by a policy", |r| r.sb_auto_resolved),
        ("secondary disks detached", |r| r.s_detaches),
        ("detached secondaries re-attached", |r| r.s_reattaches),
        ("failovers promoting the secondary", |r| r.failover_promoted),
        ("failovers refused: secondary Failed", |r| {
            r.failover_refused_failed
        }),
        ("failovers refused: secondary not UpToDate", |r| {
            r.failover_refused_inconsistent
        }),
        ("failovers refused: secondary disconnected", |r| {
            r.failover_refused_disconnected
        }),
        ("crossing promotion requests", |r| r.race_crossing),
        ("promotion requests refused as concurrent", |r| {
            r.race_concurrent_refusals
        }),
        ("promotion requests lost with the connection", |r| {
            r.race_dropped
        }),
        ("secondary P_STATEs delivered", |r| r.s_states),
        ("primary P_STATEs delivered", |r| r.p_states),
        ("switchovers", |r| r.switchovers),
        ("secondary stops", |r| r.s_stops),
        ("secondary power losses", |r| r.s_power_losses),
        ("invalidates", |r| r.invalidates),
        ("fresh pairs with a skipped initial sync", |r| r.fresh_pairs),
        ("primary clean stops", |r| r.p_clean_stops),
        ("online verifies of a damaged secondary", |r| r.verifies),
        ("SyncTarget primaries", |r| r.st_primaries),
        ("their reads answered by the peer", |r| r.st_remote_reads),
        ("Diskless primaries (a failed local write)", |r| {
            r.p_detaches
        }),
        ("their writes, on the peer only", |r| r.p_diskless_writes),
        ("their reads, answered by the peer", |r| r.p_diskless_reads),
    ];
    let coverage: Vec<(&str, u64)> = counters.iter().map(|&(n, f)| (n, sum(f))).collect();
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
    for &(what, n) in &coverage {
        assert!(n > 0, "no seed exercised {what}");
    }
}
