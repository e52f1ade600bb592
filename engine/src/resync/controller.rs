//! DRBD's resync-rate controller (`drbd_rs_controller`, `drbd_rs_number_requests`), its
//! c-min-rate throttle (`drbd_rs_c_min_rate_throttle`) and the progress marks both use
//! (`rs_mark_left` / `rs_mark_time`), as pure arithmetic over counters.
//!
//! The side that issues requests (the SyncTarget, or the verify source) runs one
//! [`Controller::step`] every [`SLEEP_TIME_MS`] (DRBD's `SLEEP_TIME`, HZ/10 = 100 ms). It is
//! fed the sectors whose replies arrived since the previous step (`sect_in`) and the
//! sectors still in flight after those are taken off, and returns how many 4 KiB blocks to
//! request in this step. All quantities are 512-byte sectors per 100 ms step unless named
//! otherwise; DRBD's integer divisions (C truncation toward zero) are kept, so a table of
//! hand-computed steps matches the kernel's (see the tests).
//!
//! Dynamic mode (`c-plan-ahead` > 0), with `steps = c-plan-ahead` slots of plan:
//!
//! - `want` = `resync-rate`/5 × steps at the start (nothing in flight and nothing came
//!   in), else `c-fill-target` if non-zero, else `sect_in × c-delay-target`;
//! - `correction = want − in_flight − planned`; `correction / steps` is added to every slot
//!   of the FIFO plan; the head slot is popped;
//! - `req = sect_in + popped`, clamped to `0..=c-max-rate/5`;
//! - blocks = `req / 8`, then at most `max-buffers/2 − in_flight/8` (DRBD keeps at most
//!   half the peer's receive buffers busy, or a congested peer could deadlock).
//!
//! Fixed mode (`c-plan-ahead` = 0): `resync-rate / 40` blocks per step (250 KiB/s → 6
//! blocks → 240 KiB/s, exactly the kernel's rounding).
//!
//! Limits and defaults are DRBD 8.4's `drbd_limits.h` ([`limits`]); [`RateConfig::DRBD`]
//! holds DRBD's defaults, [`RateConfig::TANDEM`] tandem's, chosen for a 10 Gbit/s link (the
//! reasoning is on the constant).

/// One controller step in milliseconds (DRBD's `SLEEP_TIME` = HZ/10).
pub const SLEEP_TIME_MS: u64 = 100;

/// Sectors per bitmap block (4 KiB / 512).
const SECT_PER_BIT: i64 = 8;

/// DRBD 8.4's `drbd_limits.h` bounds (`_MIN`, `_MAX`, `_DEF`) of the rate settings.
pub mod limits {
    /// `resync-rate` (KiB/s), fixed-mode rate and the controller's start-up fill.
    pub const RESYNC_RATE: (u32, u32, u32) = (1, 8 << 20, 250);
    /// `c-plan-ahead` (0.1 s units; 0 = fixed mode).
    pub const C_PLAN_AHEAD: (u32, u32, u32) = (0, 300, 20);
    /// `c-delay-target` (0.1 s units).
    pub const C_DELAY_TARGET: (u32, u32, u32) = (1, 100, 10);
    /// `c-fill-target` (sectors; 0 = use `c-delay-target`).
    pub const C_FILL_TARGET: (u32, u32, u32) = (0, 1 << 20, 100);
    /// `c-max-rate` (KiB/s).
    pub const C_MAX_RATE: (u32, u32, u32) = (250, 4 << 20, 102_400);
    /// `c-min-rate` (KiB/s; 0 = never throttle for application IO).
    pub const C_MIN_RATE: (u32, u32, u32) = (0, 4 << 20, 250);
    /// `max-buffers` (4 KiB pages).
    pub(crate) const MAX_BUFFERS: (u32, u32, u32) = (32, 131_072, 2048);
}

/// The resync-rate settings (DRBD's `disk_conf` / `net_conf` names and units).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateConfig {
    /// `resync-rate`, KiB/s: the rate of fixed mode, and the start-up fill of dynamic mode.
    pub resync_rate: u32,
    /// `c-plan-ahead`, 0.1 s: slots of the plan; 0 selects fixed mode.
    pub c_plan_ahead: u32,
    /// `c-delay-target`, 0.1 s: in-flight target as a multiple of the incoming rate (used
    /// only when `c_fill_target` is 0).
    pub c_delay_target: u32,
    /// `c-fill-target`, sectors: how much the controller keeps in flight.
    pub c_fill_target: u32,
    /// `c-max-rate`, KiB/s: the most requested per step.
    pub c_max_rate: u32,
    /// `c-min-rate`, KiB/s: while the application uses the disk, resync is held back to
    /// this rate; 0 never holds it back.
    pub c_min_rate: u32,
    /// `max-buffers`, 4 KiB pages: at most half of it is requested and not answered.
    pub max_buffers: u32,
}

impl RateConfig {
    /// DRBD 8.4's defaults (`drbd_limits.h`).
    pub const DRBD: RateConfig = RateConfig {
        resync_rate: limits::RESYNC_RATE.2,
        c_plan_ahead: limits::C_PLAN_AHEAD.2,
        c_delay_target: limits::C_DELAY_TARGET.2,
        c_fill_target: limits::C_FILL_TARGET.2,
        c_max_rate: limits::C_MAX_RATE.2,
        c_min_rate: limits::C_MIN_RATE.2,
        max_buffers: limits::MAX_BUFFERS.2,
    };

    /// tandem's defaults, for a 10 Gbit/s link (1.25 GB/s raw, ≈ 1131 MiB/s of TCP payload
    /// at MTU 1500), an SSD/NVMe backing device, and the two goals of issue 5: fill the
    /// link when the applications are idle, leave them most of the disk when they are
    /// busy. DRBD's defaults reach 8 MiB/s after 20 s on such a link (c-fill-target 100
    /// sectors makes the plan's corrections tiny once replies come back within a step) and
    /// stop at 100 MiB/s (c-max-rate) and 40 MiB/s (max-buffers 2048 → 4 MiB per step).
    ///
    /// - `c-max-rate` 1,228,800 KiB/s (1200 MiB/s, 245,760 sectors per step): just above
    ///   the link's payload rate, so the link, not the cap, is the limit.
    /// - `c-fill-target` 65,536 sectors (32 MiB ≈ 28 ms of the link): what stays queued at
    ///   each step boundary so the link never idles; in the controller model of the tests
    ///   (replies at link rate) it reaches 90% of the link in 1.7 s. 32 MiB of queued
    ///   resync reads is ≈ 13 ms of a 2.5 GB/s NVMe: the latency an application's first
    ///   IO sees before the throttle (next step) holds resync back.
    /// - `c-plan-ahead` 10 (1 s): half of DRBD's 2 s, still ≥ 5 × any LAN round trip
    ///   (DRBD's guidance), and a plan that reacts twice as fast.
    /// - `resync-rate` 102,400 KiB/s (100 MiB/s): the fixed-mode rate if `c-plan-ahead` is
    ///   set to 0, and the start-up fill (20,480 × 10 sectors = 100 MiB planned over 1 s),
    ///   instead of DRBD's 250 KiB/s that starts the ramp from almost nothing.
    /// - `max-buffers` 81,920: half of it (40,960 blocks = 160 MiB) bounds the requests
    ///   not yet answered, above one step at c-max-rate (120 MiB) plus the fill target
    ///   (32 MiB). In tandem this bounds requests, not memory: replies are read off the
    ///   socket only as fast as they are written.
    /// - `c-min-rate` 25,600 KiB/s (25 MiB/s): while the application does any IO on the
    ///   backing device (> 32 KiB since the last check) resync runs at about this rate:
    ///   2% of the link, 1–2% of an NVMe, 5% of a 500 MB/s SATA SSD, so the application
    ///   keeps the disk; yet a crash resync of a full default activity log (1237 × 4 MiB
    ///   ≈ 4.8 GiB) still ends in ≈ 3.3 minutes under full load, where DRBD's 250 KiB/s
    ///   floor (the complaint in anchors.md §4) takes 5.6 hours.
    pub const TANDEM: RateConfig = RateConfig {
        resync_rate: 102_400,
        c_plan_ahead: 10,
        c_delay_target: 10,
        c_fill_target: 65_536,
        c_max_rate: 1_228_800,
        c_min_rate: 25_600,
        max_buffers: 81_920,
    };

    /// Checks every value against DRBD's limits.
    pub fn validate(&self) -> Result<(), RateConfigError> {
        let check = |name: &'static str, v: u32, (min, max, _): (u32, u32, u32)| {
            if v < min || v > max {
                Err(RateConfigError {
                    name,
                    value: v,
                    min,
                    max,
                })
            } else {
                Ok(())
            }
        };
        check("resync-rate", self.resync_rate, limits::RESYNC_RATE)?;
        check("c-plan-ahead", self.c_plan_ahead, limits::C_PLAN_AHEAD)?;
        check(
            "c-delay-target",
            self.c_delay_target,
            limits::C_DELAY_TARGET,
        )?;
        check("c-fill-target", self.c_fill_target, limits::C_FILL_TARGET)?;
        check("c-max-rate", self.c_max_rate, limits::C_MAX_RATE)?;
        check("c-min-rate", self.c_min_rate, limits::C_MIN_RATE)?;
        check("max-buffers", self.max_buffers, limits::MAX_BUFFERS)
    }
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig::TANDEM
    }
}

/// A rate setting outside DRBD's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name} = {value} is outside {min}..={max}")]
pub struct RateConfigError {
    /// DRBD's option name.
    pub name: &'static str,
    /// The value given.
    pub value: u32,
    /// Smallest allowed.
    pub min: u32,
    /// Largest allowed.
    pub max: u32,
}

/// What one controller step decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// 4 KiB blocks to request in this step (0 when the plan or `max-buffers` says wait).
    pub blocks: u32,
    /// The rate DRBD reports for this step (`c_sync_rate`, KiB/s).
    pub rate_kib: u32,
}

/// DRBD's resync-rate controller. See the module docs.
#[derive(Debug, Clone)]
pub struct Controller {
    cfg: RateConfig,
    /// The FIFO plan of corrections (`rs_plan_s`), `c_plan_ahead` slots.
    plan: Vec<i64>,
    head: usize,
    /// Sum of the plan (`plan->total`).
    total: i64,
}

impl Controller {
    /// A controller with an empty plan.
    pub fn new(cfg: RateConfig) -> Result<Self, RateConfigError> {
        cfg.validate()?;
        Ok(Controller {
            plan: vec![0; cfg.c_plan_ahead as usize],
            cfg,
            head: 0,
            total: 0,
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &RateConfig {
        &self.cfg
    }

    /// New settings (e.g. from `P_SYNC_PARAM89`/`_95`). Like `drbd_adm_disk_opts`, a
    /// plan of a different length starts empty; one of the same length is kept.
    pub fn set_config(&mut self, cfg: RateConfig) -> Result<(), RateConfigError> {
        cfg.validate()?;
        if cfg.c_plan_ahead != self.cfg.c_plan_ahead {
            self.plan = vec![0; cfg.c_plan_ahead as usize];
            self.head = 0;
            self.total = 0;
        }
        self.cfg = cfg;
        Ok(())
    }

    /// Empties the plan (`drbd_rs_controller_reset`, at the start of every resync).
    pub fn reset(&mut self) {
        self.plan.iter_mut().for_each(|v| *v = 0);
        self.total = 0;
    }

    /// Sectors the plan still holds (`plan->total`).
    pub fn planned(&self) -> i64 {
        self.total
    }

    /// `drbd_rs_controller`: sectors to request in this step, given the sectors whose
    /// replies came in since the last step and the sectors still in flight (after taking
    /// `sect_in` off). Dynamic mode only; in fixed mode it returns the fixed rate's sectors.
    pub fn sectors(&mut self, sect_in: u64, in_flight: u64) -> u64 {
        let steps = self.plan.len();
        if steps == 0 {
            return u64::from(self.cfg.resync_rate / 40) * SECT_PER_BIT as u64;
        }
        // ≤ 300 (`C_PLAN_AHEAD` max).
        let steps_i = i64::try_from(steps).unwrap_or(i64::MAX);
        let sect_in_i = i64::try_from(sect_in).unwrap_or(i64::MAX / 4);
        let in_flight_i = i64::try_from(in_flight).unwrap_or(i64::MAX / 4);
        // `(rate × 2 × SLEEP_TIME) / HZ` is rate / 5 for every HZ that is a multiple of 10.
        let want = if in_flight_i + sect_in_i == 0 {
            i64::from(self.cfg.resync_rate / 5) * steps_i
        } else if self.cfg.c_fill_target != 0 {
            i64::from(self.cfg.c_fill_target)
        } else {
            sect_in_i.saturating_mul(i64::from(self.cfg.c_delay_target))
        };
        let correction = want - in_flight_i - self.total;
        // C's `/` truncates toward zero, as Rust's does.
        let cps = correction / steps_i;
        self.plan.iter_mut().for_each(|v| *v += cps);
        self.total += cps * steps_i;
        let cur = std::mem::take(&mut self.plan[self.head]);
        self.head = (self.head + 1) % steps;
        self.total -= cur;
        let max_sect = i64::from(self.cfg.c_max_rate / 5);
        u64::try_from((sect_in_i + cur).clamp(0, max_sect.max(0))).unwrap_or(0)
    }

    /// `drbd_rs_number_requests`: the 4 KiB blocks to request in this step, capped so
    /// that at most `max-buffers/2` blocks are in flight.
    pub fn step(&mut self, sect_in: u64, in_flight: u64) -> Step {
        let (blocks, rate_kib) = if self.plan.is_empty() {
            let rate = self.cfg.resync_rate;
            (i64::from(rate / 40), rate)
        } else {
            let n = i64::try_from(self.sectors(sect_in, in_flight) >> 3).unwrap_or(i64::MAX);
            // `number × HZ × 4 / SLEEP_TIME`.
            (n, u32::try_from(n * 40).unwrap_or(u32::MAX))
        };
        let mxb = i64::from(self.cfg.max_buffers / 2);
        let in_flight_blocks = i64::try_from(in_flight / 8).unwrap_or(i64::MAX);
        let blocks = blocks.min(mxb - in_flight_blocks).max(0);
        Step {
            blocks: u32::try_from(blocks).unwrap_or(u32::MAX),
            rate_kib,
        }
    }
}

/// DRBD's sync marks: `DRBD_SYNC_MARKS` (8) snapshots of the blocks left, one every
/// `DRBD_SYNC_MARK_STEP` (3 s), from which the rates and the ETA are computed.
#[derive(Debug, Clone)]
pub struct SyncMarks {
    left: [u64; MARKS],
    time_ms: [u64; MARKS],
    last: usize,
}

const MARKS: usize = 8;
/// Milliseconds between two sync marks (`DRBD_SYNC_MARK_STEP`, 3 s).
pub(crate) const SYNC_MARK_STEP_MS: u64 = 3000;

impl SyncMarks {
    /// All marks at `left` blocks, `now_ms`.
    pub fn new(left: u64, now_ms: u64) -> Self {
        SyncMarks {
            left: [left; MARKS],
            time_ms: [now_ms; MARKS],
            last: 0,
        }
    }

    /// `drbd_advance_rs_marks`: a new mark when the last is ≥ 3 s old and progress was made
    /// (not while paused).
    pub fn advance(&mut self, left: u64, now_ms: u64, paused: bool) {
        let last_t = self.time_ms[self.last];
        if now_ms >= last_t + SYNC_MARK_STEP_MS && self.left[self.last] != left && !paused {
            let next = (self.last + 1) % MARKS;
            self.time_ms[next] = now_ms;
            self.left[next] = left;
            self.last = next;
        }
    }

    /// The resync was suspended: the newest mark starts now, so the pause does not count
    /// into the rate (DRBD's "Resync suspended").
    pub fn suspend(&mut self, now_ms: u64) {
        self.time_ms[self.last] = now_ms;
    }

    fn rate_since(&self, i: usize, left: u64, now_ms: u64) -> (u64, u64) {
        let dt = now_ms.saturating_sub(self.time_ms[i]).max(1);
        let db = self.left[i].saturating_sub(left);
        (db, dt)
    }

    /// KiB/s since the previous mark (3–6 s): the window of the c-min-rate check.
    pub fn recent_rate_kib(&self, left: u64, now_ms: u64) -> u64 {
        let (db, dt) = self.rate_since((self.last + MARKS - 1) % MARKS, left, now_ms);
        // DRBD divides whole seconds (at least 1); milliseconds give the same rate, finer.
        db.saturating_mul(4000) / dt.max(1000)
    }

    /// KiB/s since the mark six steps back (≥ 18 s): what status shows, as `/proc/drbd`.
    pub fn rate_kib(&self, left: u64, now_ms: u64) -> u64 {
        let (db, dt) = self.rate_since((self.last + 2) % MARKS, left, now_ms);
        db.saturating_mul(4000) / dt.max(1000)
    }

    /// Estimated seconds to go at the status rate, `None` while no progress was seen.
    pub fn eta_secs(&self, left: u64, now_ms: u64) -> Option<u64> {
        let (db, dt) = self.rate_since((self.last + 2) % MARKS, left, now_ms);
        (db > 0).then(|| left.saturating_mul(dt) / db / 1000)
    }
}

/// DRBD's c-min-rate check (`drbd_rs_c_min_rate_throttle`): hold resync back while the
/// application uses the backing device and resync already runs faster than `c-min-rate`.
///
/// "The application uses the device" is: more than 64 sectors (32 KiB) of non-resync IO on
/// the backing device since the last time it was seen, or application IO waiting (DRBD:
/// for an activity-log slot). The driver counts the first (every local read and write
/// that is not resync's, including the peer's replicated writes on a Secondary) and knows
/// the second.
#[derive(Debug, Clone, Default)]
pub struct MinRateThrottle {
    last_events: u64,
}

/// Sectors of application IO since the last check above which the device counts as busy.
pub(crate) const APP_IO_THRESHOLD_SECTORS: u64 = 64;

impl MinRateThrottle {
    /// Starts counting from `app_io_sectors` (DRBD resets `rs_last_events` when a resync
    /// starts).
    pub fn new(app_io_sectors: u64) -> Self {
        MinRateThrottle {
            last_events: app_io_sectors,
        }
    }

    /// Whether to hold resync back now. `app_io_sectors` is the cumulative count of
    /// non-resync IO sectors on the backing device, `app_waiting` whether application IO
    /// waits, `recent_rate_kib` resync's rate over the last marks
    /// ([`SyncMarks::recent_rate_kib`]).
    pub fn should_throttle(
        &mut self,
        c_min_rate: u32,
        app_io_sectors: u64,
        app_waiting: bool,
        recent_rate_kib: u64,
    ) -> bool {
        if c_min_rate == 0 {
            return false;
        }
        let busy = app_io_sectors.saturating_sub(self.last_events) > APP_IO_THRESHOLD_SECTORS;
        if app_waiting || busy {
            self.last_events = app_io_sectors;
            return recent_rate_kib > u64::from(c_min_rate);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(plan: u32, fill: u32, max_rate: u32) -> RateConfig {
        RateConfig {
            resync_rate: 250,
            c_plan_ahead: plan,
            c_delay_target: 10,
            c_fill_target: fill,
            c_max_rate: max_rate,
            c_min_rate: 250,
            max_buffers: 2048,
        }
    }

    /// Steps computed by hand from `drbd_rs_controller` with C's integer arithmetic.
    ///
    /// steps = 4, c-fill-target 100, resync-rate 250 (start want = 250/5 × 4 = 200).
    ///
    /// | step | in | in flight | want | correction | cps | popped | planned after | req |
    /// |---|---|---|---|---|---|---|---|---|
    /// | 1 | 0 | 0 | 200 (start) | 200 | 50 | 50 | 150 | 50 |
    /// | 2 | 0 | 50 | 100 | 100 − 50 − 150 = −100 | −25 | 25 | 25 | 25 |
    /// | 3 | 50 | 25 | 100 | 100 − 25 − 25 = 50 | 12 | 37 | 36 | 87 |
    /// | 4 | 87 | 25 | 100 | 100 − 25 − 36 = 39 | 9 | 46 | 26 | 133 |
    /// | 5 | 0 | 158 | 100 | 100 − 158 − 26 = −84 | −21 | −25 | −33 | 0 (clamped) |
    #[test]
    fn dynamic_steps_match_hand_computed_drbd_arithmetic() {
        let mut c = Controller::new(cfg(4, 100, 102_400)).expect("valid");
        assert_eq!(c.sectors(0, 0), 50);
        assert_eq!(c.planned(), 150);
        assert_eq!(c.sectors(0, 50), 25);
        assert_eq!(c.planned(), 25);
        assert_eq!(c.sectors(50, 25), 87);
        assert_eq!(c.planned(), 36);
        assert_eq!(c.sectors(87, 25), 133);
        assert_eq!(c.planned(), 26);
        assert_eq!(c.sectors(0, 158), 0);
        assert_eq!(c.planned(), -33);
    }

    /// c-delay-target mode (fill 0): want = sect_in × 10; and the c-max-rate clamp.
    #[test]
    fn delay_target_and_max_rate_clamp() {
        // steps 2, max-rate 250 KiB/s → 50 sectors per step.
        let mut c = Controller::new(cfg(2, 0, 250)).expect("valid");
        // start: want = 50 × 2 = 100, cps 50, plan [50,50] t 100, pop 50, req 50.
        assert_eq!(c.sectors(0, 0), 50);
        // in 40, fl 10: want 400, corr 400 − 10 − 50 = 340, cps 170, slots [170,220] t 390,
        // pop 220 → t 170, req = 40 + 220 = 260 → clamped to 50.
        assert_eq!(c.sectors(40, 10), 50);
        assert_eq!(c.planned(), 170);
    }

    #[test]
    fn fixed_mode_and_max_buffers_cap() {
        let mut c = Controller::new(cfg(0, 100, 102_400)).expect("valid");
        assert_eq!(
            c.step(0, 0),
            Step {
                blocks: 6,
                rate_kib: 250
            }
        );
        // max-buffers 2048 → 1024 blocks; 8000 sectors (1000 blocks) in flight leave 24.
        let mut r = cfg(0, 100, 102_400);
        r.resync_rate = 40_000; // 1000 blocks per step
        let mut c = Controller::new(r).expect("valid");
        assert_eq!(c.step(0, 8000).blocks, 24);
        assert_eq!(c.step(0, 9000).blocks, 0);
        // Dynamic: number × 40 is the reported rate.
        let mut c = Controller::new(cfg(4, 100, 102_400)).expect("valid");
        assert_eq!(
            c.step(0, 0),
            Step {
                blocks: 6,
                rate_kib: 240
            }
        );
    }

    /// The plan converges: with replies coming back within a step (the link drains what
    /// was asked), in-flight at the step boundary settles at c-fill-target, and the
    /// requests never exceed c-max-rate.
    #[test]
    fn converges_to_fill_target_and_honours_max_rate() {
        // A pipe draining `link` sectors per step; requests join its backlog.
        let run = |cfg: RateConfig, link: u64, steps: usize| {
            let mut c = Controller::new(cfg).expect("valid");
            let (mut backlog, mut max_req, mut hist) = (0u64, 0u64, Vec::new());
            for _ in 0..steps {
                let done = backlog.min(link);
                backlog -= done;
                let req = c.sectors(done, backlog);
                max_req = max_req.max(req);
                backlog += req;
                hist.push((done, backlog - req));
            }
            (max_req, hist)
        };
        // Link faster than c-max-rate: capped at max-rate, in flight drains.
        let r = cfg(10, 2048, 10_240); // 2048 sectors per step at most
        let (max_req, hist) = run(r, 100_000, 300);
        assert_eq!(max_req, 2048);
        assert!(hist[250..].iter().all(|&(done, _)| done == 2048));
        // Link slower than c-max-rate: in flight at the boundary → c-fill-target.
        let r = cfg(10, 2048, 1_000_000);
        let (_, hist) = run(r, 5000, 400);
        let (done, in_flight) = hist[399];
        assert_eq!(done, 5000);
        assert!(
            (1900..=2200).contains(&in_flight),
            "in flight {in_flight} should settle at the fill target 2048"
        );
        // tandem's defaults on a 10 Gbit link (1131 MiB/s = 231,628 sectors per step):
        // ≥ 90% of the link within 20 steps (2 s).
        let (_, hist) = run(RateConfig::TANDEM, 231_628, 40);
        let first = hist
            .iter()
            .position(|&(d, _)| d >= 208_465)
            .expect("reaches 90%");
        assert!(first <= 20, "90% of the link after {first} steps");
        // DRBD's defaults on the same link stay below 10 MiB/s (2048 sectors per step)
        // for 20 s.
        let (_, hist) = run(RateConfig::DRBD, 231_628, 200);
        assert!(hist.iter().all(|&(d, _)| d < 2048));
    }

    #[test]
    fn limits_are_drbds() {
        assert!(RateConfig::DRBD.validate().is_ok());
        assert!(RateConfig::TANDEM.validate().is_ok());
        let mut r = RateConfig::TANDEM;
        r.c_max_rate = 249;
        assert_eq!(r.validate().expect_err("below min").name, "c-max-rate");
        r = RateConfig::TANDEM;
        r.c_plan_ahead = 301;
        assert!(Controller::new(r).is_err());
        let mut c = Controller::new(RateConfig::TANDEM).expect("valid");
        c.sectors(0, 0);
        assert!(c.planned() != 0);
        r = RateConfig::TANDEM;
        r.c_plan_ahead = 20;
        c.set_config(r).expect("valid");
        assert_eq!(c.planned(), 0);
    }

    #[test]
    fn min_rate_throttles_only_when_the_app_is_busy_and_resync_is_fast() {
        let mut t = MinRateThrottle::new(1000);
        // Idle application: never.
        assert!(!t.should_throttle(250, 1000, false, 100_000));
        assert!(!t.should_throttle(250, 1064, false, 100_000)); // 64 sectors: not > 64

        // Busy (> 64 sectors since last): throttle if resync runs faster than c-min-rate.
        assert!(t.should_throttle(250, 1065, false, 251));
        // The counter moved on: the same total is not busy again.
        assert!(!t.should_throttle(250, 1065, false, 100_000));
        assert!(!t.should_throttle(250, 2000, false, 250)); // at c-min-rate: no
        assert!(t.should_throttle(250, 2000, true, 300)); // app waiting
        assert!(!t.should_throttle(0, 9000, true, 1 << 30)); // disabled
    }

    #[test]
    fn marks_give_rate_and_eta() {
        let mut m = SyncMarks::new(10_000, 0);
        // 1000 blocks (4000 KiB) per 3 s.
        for k in 1..=8u64 {
            m.advance(10_000 - 1000 * k, 3000 * k, false);
        }
        let left = 2000;
        let now = 24_000;
        // Previous mark: t 21 s, left 3000 → 1000 blocks / 3 s = 1333 KiB/s.
        assert_eq!(m.recent_rate_kib(left, now), 1333);
        // Status window: mark (last + 2) % 8 = t 6 s, left 8000 → 6000 blocks / 18 s.
        assert_eq!(m.rate_kib(left, now), 1333);
        assert_eq!(m.eta_secs(left, now), Some(6));
        // Paused: no new mark.
        m.advance(1000, 40_000, true);
        assert_eq!(m.recent_rate_kib(1000, 40_000), 4000 * 2000 / 19_000);
        assert_eq!(SyncMarks::new(5, 0).eta_secs(5, 10), None);
    }
}
