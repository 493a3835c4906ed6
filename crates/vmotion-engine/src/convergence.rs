//! Convergence: a pure function of the iteration statistics, the policy and the time.
//!
//! After each pre-copy iteration the engine asks [`judge`]: can what is still dirty,
//! plus the device state, be sent within `max_downtime` at the bandwidth the last
//! iteration achieved? If so, stop and copy. If not, and a limit (iterations, total time)
//! is reached, give up — abort, or force the switchover anyway, as the policy says. If
//! not, go on, stepping up the guest's throttle (auto-converge, like QEMU's: start at
//! 20 %, add 10 % each time) whenever an iteration did not shrink the dirty set enough:
//! when what it left dirty is at least `trigger_percent` (50 %, QEMU's
//! `throttle-trigger-threshold`) of what it sent, the guest dirties memory at half the
//! link's speed or more, and pre-copy would crawl towards convergence or never reach it.

use std::time::Duration;

/// What to do when a limit is reached before convergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnLimit {
    /// Abort: the VM keeps running at the source.
    #[default]
    Abort,
    /// Switch over anyway, accepting a longer downtime.
    Force,
}

/// Auto-converge: throttling a guest that dirties memory faster than it can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoConverge {
    /// Throttle at all.
    pub enabled: bool,
    /// First throttle, percent of vCPU time taken away.
    pub initial_percent: u8,
    /// Added each time an iteration fails to shrink the dirty set.
    pub step_percent: u8,
    /// Never more than this.
    pub max_percent: u8,
    /// Step up when an iteration leaves at least this share of what it sent dirty.
    pub trigger_percent: u8,
}

impl Default for AutoConverge {
    fn default() -> Self {
        // QEMU's defaults (cpu-throttle-initial 20, cpu-throttle-increment 10, max 99).
        Self {
            enabled: true,
            initial_percent: 20,
            step_percent: 10,
            max_percent: 99,
            trigger_percent: 50,
        }
    }
}

/// The convergence knobs of a VM's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvergencePolicy {
    /// Longest acceptable pause.
    pub max_downtime: Duration,
    /// Most pre-copy iterations after the first full pass.
    pub max_iterations: u32,
    /// Longest pre-copy phase.
    pub max_total_time: Duration,
    /// Abort or force at a limit.
    pub on_limit: OnLimit,
    /// Throttling.
    pub auto_converge: AutoConverge,
}

impl Default for ConvergencePolicy {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(300),
            max_iterations: 30,
            max_total_time: Duration::from_secs(300),
            on_limit: OnLimit::Abort,
            auto_converge: AutoConverge::default(),
        }
    }
}

/// What one pre-copy iteration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IterationStats {
    /// 0 is the full pass.
    pub iteration: u32,
    /// Pages sent (zero pages included).
    pub pages: u64,
    /// Bytes put on the wire.
    pub bytes: u64,
    /// How long sending took.
    pub duration: Duration,
    /// Pages the dirty log reported after it (what the next iteration must send).
    pub dirty_after: u64,
    /// Throttle in force during it, percent.
    pub throttle_percent: u8,
}

impl IterationStats {
    /// Bytes per second achieved, if measurable.
    pub fn bandwidth(&self) -> Option<f64> {
        (self.duration > Duration::ZERO && self.bytes > 0)
            .then(|| self.bytes as f64 / self.duration.as_secs_f64())
    }

    /// Dirty pages per second during the iteration.
    pub fn dirty_rate(&self) -> Option<f64> {
        (self.duration > Duration::ZERO)
            .then(|| self.dirty_after as f64 / self.duration.as_secs_f64())
    }
}

/// Which limit stopped pre-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_iterations`.
    Iterations,
    /// `max_total_time`.
    TotalTime,
    /// Nothing is left dirty, yet the device state alone does not fit `max_downtime`:
    /// more iterations cannot help.
    Unimprovable,
}

/// The decision after an iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Converged: pause and send the rest.
    StopAndCopy {
        /// The downtime the estimate promises.
        expected_downtime: Duration,
    },
    /// Another iteration, with this throttle.
    Continue {
        /// Throttle for the next iteration, percent (0 = none).
        throttle_percent: u8,
    },
    /// A limit was reached first.
    LimitReached {
        /// Which.
        limit: Limit,
        /// Switch over anyway (`OnLimit::Force`) rather than abort.
        force: bool,
        /// The downtime forcing would cost, by the same estimate.
        expected_downtime: Duration,
    },
}

/// The time to send `bytes` at `bandwidth` bytes/s (`Duration::MAX` if nothing moves).
pub fn transfer_time(bytes: u64, bandwidth: Option<f64>) -> Duration {
    match bandwidth {
        _ if bytes == 0 => Duration::ZERO,
        Some(bw) if bw > 0.0 => {
            Duration::try_from_secs_f64(bytes as f64 / bw).unwrap_or(Duration::MAX)
        }
        _ => Duration::MAX,
    }
}

/// Judges the state after the last iteration of `history` (which must not be empty).
/// `elapsed` is the time since pre-copy began; `throttle_percent` the throttle now.
pub fn judge(
    policy: &ConvergencePolicy,
    page_size: u64,
    device_state_bytes: u64,
    history: &[IterationStats],
    throttle_percent: u8,
    elapsed: Duration,
) -> Verdict {
    let last = history.last().expect("judge runs after an iteration");
    let remaining = last
        .dirty_after
        .saturating_mul(page_size)
        .saturating_add(device_state_bytes);
    // The most recent iteration that moved anything measured the link; an iteration that
    // sent nothing measured nothing.
    let bandwidth = history.iter().rev().find_map(IterationStats::bandwidth);
    let expected_downtime = transfer_time(remaining, bandwidth);
    if expected_downtime <= policy.max_downtime {
        return Verdict::StopAndCopy { expected_downtime };
    }
    let limit = if last.dirty_after == 0 {
        Some(Limit::Unimprovable)
    } else if last.iteration >= policy.max_iterations {
        Some(Limit::Iterations)
    } else if elapsed >= policy.max_total_time {
        Some(Limit::TotalTime)
    } else {
        None
    };
    if let Some(limit) = limit {
        return Verdict::LimitReached {
            limit,
            force: policy.on_limit == OnLimit::Force,
            expected_downtime,
        };
    }
    // Did this iteration shrink what is left to send enough? It sent `pages` (what the
    // previous one left dirty) and left `dirty_after`.
    let ac = &policy.auto_converge;
    let too_slow = last.pages > 0
        && u128::from(last.dirty_after) * 100
            >= u128::from(last.pages) * u128::from(ac.trigger_percent);
    let throttle_percent = if ac.enabled && too_slow {
        if throttle_percent == 0 {
            ac.initial_percent.min(ac.max_percent)
        } else {
            throttle_percent
                .saturating_add(ac.step_percent)
                .min(ac.max_percent)
        }
    } else {
        throttle_percent
    };
    Verdict::Continue { throttle_percent }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(iteration: u32, dirty_after: u64, ms: u64) -> IterationStats {
        IterationStats {
            iteration,
            pages: 1000,
            bytes: 1000 * 4096,
            duration: Duration::from_millis(ms),
            dirty_after,
            throttle_percent: 0,
        }
    }

    #[test]
    fn converges_when_the_rest_fits_the_downtime() {
        let p = ConvergencePolicy::default();
        // 4 MB in 100 ms = 40.96 MB/s; 100 pages + 0 device state = 10 ms.
        let v = judge(&p, 4096, 0, &[it(0, 100, 100)], 0, Duration::ZERO);
        assert_eq!(
            v,
            Verdict::StopAndCopy {
                expected_downtime: Duration::from_millis(10)
            }
        );
        // The device state counts too: 12 MB more is 300 ms more.
        let v = judge(&p, 4096, 12_288_000, &[it(0, 100, 100)], 0, Duration::ZERO);
        assert!(matches!(v, Verdict::Continue { .. }), "{v:?}");
    }

    #[test]
    fn throttle_steps_up_only_when_the_dirty_set_does_not_shrink() {
        let p = ConvergencePolicy {
            max_downtime: Duration::from_millis(1),
            ..ConvergencePolicy::default()
        };
        let t = |history: &[IterationStats], now: u8| match judge(
            &p,
            4096,
            0,
            history,
            now,
            Duration::ZERO,
        ) {
            Verdict::Continue { throttle_percent } => throttle_percent,
            v => panic!("{v:?}"),
        };
        // Each iteration sent 1000 pages.
        assert_eq!(
            t(&[it(0, 400, 100)], 0),
            0,
            "left 40 %: shrinking fast enough"
        );
        assert_eq!(t(&[it(0, 500, 100)], 0), 20, "left 50 %: start at 20 %");
        assert_eq!(
            t(&[it(0, 5000, 100), it(1, 1000, 100)], 20),
            30,
            "did not shrink"
        );
        assert_eq!(
            t(&[it(0, 5000, 100), it(1, 300, 100)], 30),
            30,
            "shrinking keeps it"
        );
        assert_eq!(t(&[it(0, 5000, 100), it(1, 6000, 100)], 95), 99, "capped");
        let off = ConvergencePolicy {
            auto_converge: AutoConverge {
                enabled: false,
                ..AutoConverge::default()
            },
            ..p
        };
        assert_eq!(
            judge(&off, 4096, 0, &[it(0, 900, 100)], 0, Duration::ZERO),
            Verdict::Continue {
                throttle_percent: 0
            }
        );
    }

    #[test]
    fn limits_abort_or_force() {
        let mut p = ConvergencePolicy {
            max_iterations: 3,
            max_total_time: Duration::from_secs(10),
            ..ConvergencePolicy::default()
        };
        let big = it(3, 50_000, 100);
        assert!(matches!(
            judge(&p, 4096, 0, &[big], 0, Duration::ZERO),
            Verdict::LimitReached {
                limit: Limit::Iterations,
                force: false,
                ..
            }
        ));
        p.on_limit = OnLimit::Force;
        assert!(matches!(
            judge(
                &p,
                4096,
                0,
                &[it(1, 50_000, 100)],
                0,
                Duration::from_secs(10)
            ),
            Verdict::LimitReached {
                limit: Limit::TotalTime,
                force: true,
                ..
            }
        ));
    }

    /// An idle guest: nothing dirty, so more iterations cannot shrink the downtime; it is
    /// never throttled, and an iteration that sent nothing does not erase the bandwidth.
    #[test]
    fn idle_guest_is_not_throttled_and_not_iterated_forever() {
        let p = ConvergencePolicy {
            max_downtime: Duration::from_millis(1),
            ..ConvergencePolicy::default()
        };
        // Device state of 1 MB at 40.96 MB/s: 24 ms > 1 ms, and nothing dirty.
        assert!(matches!(
            judge(&p, 4096, 1_000_000, &[it(0, 0, 100)], 0, Duration::ZERO),
            Verdict::LimitReached {
                limit: Limit::Unimprovable,
                force: false,
                ..
            }
        ));
        // An empty iteration after a measured one keeps the measured bandwidth.
        let empty = IterationStats {
            iteration: 1,
            pages: 0,
            bytes: 0,
            duration: Duration::ZERO,
            dirty_after: 3,
            throttle_percent: 0,
        };
        let roomy = ConvergencePolicy::default();
        assert!(matches!(
            judge(&roomy, 4096, 0, &[it(0, 5, 100), empty], 0, Duration::ZERO),
            Verdict::StopAndCopy { .. }
        ));
        // And an iteration that sent nothing is no reason to throttle.
        let empty = IterationStats {
            dirty_after: 5000,
            ..empty
        };
        assert!(matches!(
            judge(&p, 4096, 0, &[it(0, 5000, 100), empty], 0, Duration::ZERO),
            Verdict::Continue {
                throttle_percent: 0
            }
        ));
    }

    #[test]
    fn nothing_measured_means_no_convergence_claim() {
        assert_eq!(transfer_time(0, None), Duration::ZERO);
        assert_eq!(transfer_time(1, None), Duration::MAX);
        assert_eq!(transfer_time(1, Some(0.0)), Duration::MAX);
        assert_eq!(transfer_time(1000, Some(1000.0)), Duration::from_secs(1));
    }
}
