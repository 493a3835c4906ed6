//! The engine against a simulated guest, link and destination, in simulated time.
//!
//! The guest dirties pages at a configurable rate (uniformly, from a seeded generator),
//! less the throttle; every page carries a version number that a write bumps. The link
//! moves bytes at a fixed bandwidth. The destination keeps the version of every page it
//! received, so after a commit the test checks that it holds exactly the source's memory
//! at pause time — the property live migration exists for.

use std::time::Duration;

use vmotion_engine::{
    AbortReason, Action, AutoConverge, ConvergencePolicy, DirtyBitmap, EngineConfig, Limit,
    OnLimit, Outcome, SenderEngine,
};

const PAGE: u64 = 4096;

struct Guest {
    versions: Vec<u64>,
    dirty: DirtyBitmap,
    logging: bool,
    paused: bool,
    throttle: u8,
    /// Pages per second written at no throttle.
    rate: f64,
    carry: f64,
    rng: u64,
    /// Writes that happened during the final pass (must be none: the VM is paused).
    writes_while_paused: u64,
}

impl Guest {
    fn new(pages: u64, rate: f64) -> Self {
        Self {
            versions: vec![0; pages as usize],
            dirty: DirtyBitmap::new(pages),
            logging: false,
            paused: false,
            throttle: 0,
            rate,
            carry: 0.0,
            rng: 0x9e37_79b9_7f4a_7c15,
            writes_while_paused: 0,
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic, good enough to spread writes.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Runs the guest for `dt`.
    fn run(&mut self, dt: Duration) {
        if self.paused {
            return;
        }
        let writes =
            self.rate * dt.as_secs_f64() * (1.0 - f64::from(self.throttle) / 100.0) + self.carry;
        self.carry = writes.fract();
        for _ in 0..writes as u64 {
            let page = self.next() % self.versions.len() as u64;
            self.versions[page as usize] += 1;
            if self.logging {
                self.dirty.set(page);
            }
        }
    }

    fn take_dirty(&mut self) -> DirtyBitmap {
        std::mem::replace(
            &mut self.dirty,
            DirtyBitmap::new(self.versions.len() as u64),
        )
    }
}

struct Sim {
    guest: Guest,
    /// The destination's copy: the version of each page it received (None = never).
    dest: Vec<Option<u64>>,
    /// Link bandwidth, bytes per second.
    bandwidth: f64,
    /// Round trip for Complete → Ready.
    rtt: Duration,
    /// Time to record the outcome with the key service.
    record: Duration,
    device_state: u64,
    now: Duration,
    snapshot_at_pause: Option<Vec<u64>>,
    log: Vec<Action>,
    resumed: bool,
    committed: bool,
    /// Hook: called before each action; may inject failures.
    ready_arrives: bool,
    record_succeeds: bool,
}

impl Sim {
    fn new(pages: u64, rate: f64, bandwidth: f64) -> Self {
        Self {
            guest: Guest::new(pages, rate),
            dest: vec![None; pages as usize],
            bandwidth,
            rtt: Duration::from_micros(200),
            record: Duration::from_millis(1),
            device_state: 64 * 1024,
            now: Duration::ZERO,
            snapshot_at_pause: None,
            log: Vec::new(),
            resumed: false,
            committed: false,
            ready_arrives: true,
            record_succeeds: true,
        }
    }

    fn transfer(&mut self, bytes: u64) -> Duration {
        let dt = Duration::from_secs_f64(bytes as f64 / self.bandwidth);
        self.guest.run(dt);
        self.now += dt;
        dt
    }

    /// Runs the engine to its end (or until `stop_after` actions for failure tests).
    fn run(&mut self, engine: &mut SenderEngine) {
        for _ in 0..100_000 {
            let Some(action) = engine.poll_action() else {
                if engine.outcome().is_some() {
                    return;
                }
                // Waiting for Ready that never comes: let time pass.
                self.now += Duration::from_millis(10);
                self.guest.run(Duration::from_millis(10));
                engine.handle_tick(self.now);
                continue;
            };
            self.log.push(action.clone());
            match action {
                Action::StartDirtyLog => self.guest.logging = true,
                Action::StopDirtyLog => self.guest.logging = false,
                Action::SendPages {
                    ranges, final_pass, ..
                } => {
                    // Copy each page's current version, then let the guest run for the
                    // transfer time: writes during the transfer land in the dirty log.
                    let mut pages = 0;
                    for r in &ranges {
                        for p in r.start..r.end() {
                            self.dest[p as usize] = Some(self.guest.versions[p as usize]);
                        }
                        pages += r.len;
                    }
                    let before = self.guest.versions.iter().sum::<u64>();
                    self.transfer(pages * PAGE);
                    if final_pass {
                        self.guest.writes_while_paused +=
                            self.guest.versions.iter().sum::<u64>() - before;
                    }
                    engine
                        .handle_pages_sent(self.now, pages, pages * PAGE)
                        .unwrap();
                }
                Action::FetchDirtyLog => {
                    let d = self.guest.take_dirty();
                    engine.handle_dirty_log(self.now, &d).unwrap();
                }
                Action::SetThrottle(p) => self.guest.throttle = p,
                Action::Pause => {
                    self.guest.paused = true;
                    self.snapshot_at_pause = Some(self.guest.versions.clone());
                    engine.handle_paused(self.now).unwrap();
                }
                Action::SendDeviceState => {
                    self.transfer(self.device_state);
                    engine
                        .handle_device_state_sent(self.now, self.device_state)
                        .unwrap();
                }
                Action::SendComplete => {
                    if self.ready_arrives {
                        self.now += self.rtt;
                        engine.handle_ready(self.now).unwrap();
                    }
                }
                Action::RecordOutcome(Outcome::Committed) => {
                    self.now += self.record;
                    engine
                        .handle_outcome_recorded(self.now, self.record_succeeds)
                        .unwrap();
                }
                Action::RecordOutcome(Outcome::Aborted) => {}
                Action::SendCommit => self.committed = true,
                Action::SendAbort(_) => {}
                Action::Resume => {
                    self.resumed = true;
                    self.guest.paused = false;
                }
            }
        }
        panic!("the engine did not finish");
    }

    /// After a commit: the destination holds exactly the source's memory at the pause.
    fn assert_destination_matches(&self) {
        let snapshot = self.snapshot_at_pause.as_ref().expect("paused");
        for (p, (src, dst)) in snapshot.iter().zip(&self.dest).enumerate() {
            assert_eq!(Some(*src), *dst, "page {p} differs at the destination");
        }
        assert_eq!(self.guest.writes_while_paused, 0);
    }

    fn count(&self, f: impl Fn(&Action) -> bool) -> usize {
        self.log.iter().filter(|a| f(a)).count()
    }
}

fn config(pages: u64, policy: ConvergencePolicy) -> EngineConfig {
    EngineConfig {
        guest_pages: pages,
        page_size: PAGE,
        policy,
        dirty_tracking: true,
        switchover_timeout: Duration::from_secs(2),
        device_state_estimate: 64 * 1024,
    }
}

const MB: f64 = 1_000_000.0;

/// 64 MiB guest writing 8 MB/s over a 100 MB/s link: converges without throttling, the
/// destination gets the exact memory, the downtime stays under the limit.
#[test]
fn converges_when_the_dirty_rate_is_below_bandwidth() {
    let pages = 16384;
    let policy = ConvergencePolicy {
        max_downtime: Duration::from_millis(50),
        ..ConvergencePolicy::default()
    };
    let mut sim = Sim::new(pages, 2000.0, 100.0 * MB);
    let mut e = SenderEngine::new(config(pages, policy), sim.now);
    sim.run(&mut e);
    assert_eq!(e.outcome(), Some(Outcome::Committed));
    assert!(sim.committed && !sim.resumed);
    sim.assert_destination_matches();
    let r = e.report();
    assert_eq!(r.max_throttle_percent, 0);
    assert!(r.iterations.len() >= 2, "{} iterations", r.iterations.len());
    let d = r.downtime.unwrap();
    assert!(
        d.total <= policy.max_downtime + sim.rtt + sim.record,
        "{d:?}"
    );
}

/// The estimate the engine stops on is what the switchover then measures: the final pages
/// plus the device state take the promised time (the link's bandwidth is constant here).
#[test]
fn downtime_estimate_matches_the_measured_downtime() {
    let pages = 16384;
    let policy = ConvergencePolicy {
        max_downtime: Duration::from_millis(20),
        ..ConvergencePolicy::default()
    };
    let mut sim = Sim::new(pages, 3000.0, 100.0 * MB);
    let mut e = SenderEngine::new(config(pages, policy), sim.now);
    sim.run(&mut e);
    let r = e.report();
    let expected = r.expected_downtime.unwrap();
    let d = r.downtime.unwrap();
    let measured = d.final_pages + d.device_state;
    let diff = measured.abs_diff(expected);
    assert!(
        diff < Duration::from_micros(50),
        "expected {expected:?}, measured {measured:?}"
    );
    assert_eq!(d.total, measured + d.ready_wait + d.outcome_record);
    assert!(expected <= policy.max_downtime);
}

/// Writing 160 MB/s over a 100 MB/s link cannot converge; auto-converge throttles the
/// guest step by step until it does.
#[test]
fn throttles_then_converges_when_the_dirty_rate_exceeds_bandwidth() {
    let pages = 16384;
    let policy = ConvergencePolicy {
        max_downtime: Duration::from_millis(30),
        max_iterations: 50,
        ..ConvergencePolicy::default()
    };
    let mut sim = Sim::new(pages, 40_000.0, 100.0 * MB);
    let mut e = SenderEngine::new(config(pages, policy), sim.now);
    sim.run(&mut e);
    assert_eq!(e.outcome(), Some(Outcome::Committed));
    sim.assert_destination_matches();
    let r = e.report();
    assert!(
        r.max_throttle_percent >= 20,
        "throttled to {}",
        r.max_throttle_percent
    );
    // Throttle steps are QEMU's: 20, then +10.
    let throttles: Vec<u8> = sim
        .log
        .iter()
        .filter_map(|a| match a {
            Action::SetThrottle(p) => Some(*p),
            _ => None,
        })
        .collect();
    assert_eq!(throttles[0], 20);
    for w in throttles.windows(2) {
        assert!(w[1] == w[0] + 10 || w[1] == 99, "{throttles:?}");
    }
}

fn no_auto_converge(on_limit: OnLimit) -> ConvergencePolicy {
    ConvergencePolicy {
        max_downtime: Duration::from_millis(30),
        max_iterations: 5,
        on_limit,
        auto_converge: AutoConverge {
            enabled: false,
            ..AutoConverge::default()
        },
        ..ConvergencePolicy::default()
    }
}

/// Without throttling and with the abort policy, the iteration limit ends the migration:
/// the VM was never paused and keeps running at the source; the destination is told.
#[test]
fn aborts_at_the_limit_with_the_abort_policy() {
    let pages = 16384;
    let mut sim = Sim::new(pages, 40_000.0, 100.0 * MB);
    let mut e = SenderEngine::new(config(pages, no_auto_converge(OnLimit::Abort)), sim.now);
    sim.run(&mut e);
    assert_eq!(e.outcome(), Some(Outcome::Aborted));
    assert_eq!(
        e.report().abort_reason,
        Some(AbortReason::Limit(Limit::Iterations))
    );
    assert_eq!(sim.count(|a| matches!(a, Action::Pause)), 0, "never paused");
    assert_eq!(sim.count(|a| matches!(a, Action::SendAbort(_))), 1);
    assert_eq!(sim.count(|a| matches!(a, Action::SendCommit)), 0);
    assert!(!sim.guest.paused, "the VM runs at the source");
    assert_eq!(e.report().iterations.len(), 6, "iterations 0..=5");
}

/// With the force policy the same guest is switched over anyway, with a longer downtime,
/// and the destination still gets the exact memory.
#[test]
fn forces_at_the_limit_with_the_force_policy() {
    let pages = 16384;
    let policy = no_auto_converge(OnLimit::Force);
    let mut sim = Sim::new(pages, 40_000.0, 100.0 * MB);
    let mut e = SenderEngine::new(config(pages, policy), sim.now);
    sim.run(&mut e);
    assert_eq!(e.outcome(), Some(Outcome::Committed));
    sim.assert_destination_matches();
    let d = e.report().downtime.unwrap();
    assert!(d.total > policy.max_downtime, "forced: {d:?}");
}

/// A failure after the pause but before `committed` is recorded resumes the source.
#[test]
fn failure_before_the_commit_record_resumes_the_source() {
    let pages = 4096;
    let mut sim = Sim::new(pages, 1000.0, 100.0 * MB);
    sim.ready_arrives = false;
    let mut e = SenderEngine::new(config(pages, ConvergencePolicy::default()), sim.now);
    // Run until Complete is sent, then the connection drops.
    while let Some(a) = e.poll_action() {
        let complete = a == Action::SendComplete;
        sim.log.push(a.clone());
        match a {
            Action::StartDirtyLog => sim.guest.logging = true,
            Action::SendPages { ranges, .. } => {
                let pages: u64 = ranges.iter().map(|r| r.len).sum();
                sim.transfer(pages * PAGE);
                e.handle_pages_sent(sim.now, pages, pages * PAGE).unwrap();
            }
            Action::FetchDirtyLog => {
                let d = sim.guest.take_dirty();
                e.handle_dirty_log(sim.now, &d).unwrap();
            }
            Action::Pause => {
                sim.guest.paused = true;
                e.handle_paused(sim.now).unwrap();
            }
            Action::SendDeviceState => e.handle_device_state_sent(sim.now, 1000).unwrap(),
            _ => {}
        }
        if complete {
            e.handle_failure(sim.now, "connection reset");
            break;
        }
    }
    sim.log.clear();
    let after: Vec<Action> = std::iter::from_fn(|| e.poll_action()).collect();
    assert_eq!(e.outcome(), Some(Outcome::Aborted));
    assert!(after.contains(&Action::Resume), "{after:?}");
    assert!(after.contains(&Action::SendAbort(AbortReason::Failure(
        "connection reset".into()
    ))));
    assert!(!after.contains(&Action::SendCommit));
}

/// Once `committed` is recorded, a failure changes nothing: no resume, ever.
#[test]
fn failure_after_the_commit_record_never_resumes() {
    let pages = 4096;
    let mut sim = Sim::new(pages, 1000.0, 100.0 * MB);
    let mut e = SenderEngine::new(config(pages, ConvergencePolicy::default()), sim.now);
    sim.run(&mut e);
    assert_eq!(e.outcome(), Some(Outcome::Committed));
    e.handle_failure(sim.now, "Commit could not be sent");
    e.handle_tick(sim.now + Duration::from_secs(60));
    assert_eq!(e.outcome(), Some(Outcome::Committed));
    assert_eq!(e.poll_action(), None);
    assert_eq!(sim.count(|a| matches!(a, Action::Resume)), 0);
}

/// A failure while the record is in flight is not acted on: the record decides.
#[test]
fn failure_while_recording_waits_for_the_record() {
    let pages = 4096;
    let mut sim = Sim::new(pages, 1000.0, 100.0 * MB);
    sim.record_succeeds = false;
    let mut e = SenderEngine::new(config(pages, ConvergencePolicy::default()), sim.now);
    sim.run(&mut e);
    // The key service refused the record: the source keeps the VM.
    assert_eq!(e.outcome(), Some(Outcome::Aborted));
    assert_eq!(
        e.report().abort_reason,
        Some(AbortReason::OutcomeNotRecorded)
    );
    assert!(sim.resumed);
    assert_eq!(sim.count(|a| matches!(a, Action::SendCommit)), 0);
}

/// `Ready` never comes: past the switchover timeout the source resumes.
#[test]
fn switchover_timeout_resumes_the_source() {
    let pages = 4096;
    let mut sim = Sim::new(pages, 1000.0, 100.0 * MB);
    sim.ready_arrives = false;
    let mut e = SenderEngine::new(config(pages, ConvergencePolicy::default()), sim.now);
    sim.run(&mut e);
    assert_eq!(e.outcome(), Some(Outcome::Aborted));
    assert_eq!(
        e.report().abort_reason,
        Some(AbortReason::SwitchoverTimeout)
    );
    assert!(sim.resumed);
    let d = e.report().downtime.unwrap();
    assert!(d.total > Duration::from_secs(2) && d.total < Duration::from_millis(2100));
}

/// A mover without a dirty log gets a cold migration: pause first, one full pass.
#[test]
fn cold_migration_without_dirty_tracking() {
    let pages = 4096;
    let mut sim = Sim::new(pages, 5000.0, 100.0 * MB);
    let cfg = EngineConfig {
        dirty_tracking: false,
        ..config(pages, ConvergencePolicy::default())
    };
    let mut e = SenderEngine::new(cfg, sim.now);
    sim.run(&mut e);
    assert_eq!(e.outcome(), Some(Outcome::Committed));
    sim.assert_destination_matches();
    assert!(matches!(sim.log[0], Action::Pause), "{:?}", sim.log[0]);
    assert_eq!(sim.count(|a| matches!(a, Action::SendPages { .. })), 1);
    assert_eq!(
        sim.count(|a| matches!(a, Action::StartDirtyLog | Action::FetchDirtyLog)),
        0
    );
}

#[test]
fn inputs_out_of_order_are_refused() {
    let mut e = SenderEngine::new(config(64, ConvergencePolicy::default()), Duration::ZERO);
    let err = e.handle_ready(Duration::ZERO).unwrap_err();
    assert_eq!(err.phase, "sending a pre-copy iteration");
    assert_eq!(err.input, "Ready");
    assert!(e.handle_paused(Duration::ZERO).is_err());
}

/// A dirty log of the wrong size would drop pages silently: the engine aborts instead.
#[test]
fn a_dirty_log_of_the_wrong_size_aborts() {
    let mut e = SenderEngine::new(config(128, ConvergencePolicy::default()), Duration::ZERO);
    while let Some(a) = e.poll_action() {
        match a {
            Action::SendPages { .. } => e
                .handle_pages_sent(Duration::from_millis(1), 128, 128 * PAGE)
                .unwrap(),
            Action::FetchDirtyLog => {
                e.handle_dirty_log(Duration::from_millis(2), &DirtyBitmap::new(64))
                    .unwrap();
                break;
            }
            _ => {}
        }
    }
    assert_eq!(e.outcome(), Some(Outcome::Aborted));
    assert!(
        matches!(e.report().abort_reason, Some(AbortReason::Failure(ref m)) if m.contains("64 pages"))
    );
}

/// After the pause, an abort puts Resume first: a blocked network write cannot keep the VM
/// stopped.
#[test]
fn abort_after_the_pause_resumes_before_anything_else() {
    let pages = 1024;
    let mut sim = Sim::new(pages, 100.0, 100.0 * MB);
    sim.ready_arrives = false;
    let mut e = SenderEngine::new(config(pages, ConvergencePolicy::default()), sim.now);
    while let Some(a) = e.poll_action() {
        let complete = a == Action::SendComplete;
        match a {
            Action::SendPages { ranges, .. } => {
                let n: u64 = ranges.iter().map(|r| r.len).sum();
                sim.transfer(n * PAGE);
                e.handle_pages_sent(sim.now, n, n * PAGE).unwrap();
            }
            Action::FetchDirtyLog => {
                let d = sim.guest.take_dirty();
                e.handle_dirty_log(sim.now, &d).unwrap();
            }
            Action::StartDirtyLog => sim.guest.logging = true,
            Action::Pause => e.handle_paused(sim.now).unwrap(),
            Action::SendDeviceState => e.handle_device_state_sent(sim.now, 10).unwrap(),
            _ => {}
        }
        if complete {
            assert!(e.switchover_deadline().is_some());
            e.handle_failure(sim.now, "stall");
            break;
        }
    }
    assert_eq!(e.poll_action(), Some(Action::Resume));
    assert!(e.switchover_deadline().is_none());
}

/// A pause that fails partway is followed by a best-effort resume.
#[test]
fn a_failed_pause_is_followed_by_resume() {
    let mut e = SenderEngine::new(
        EngineConfig {
            dirty_tracking: false,
            ..config(64, ConvergencePolicy::default())
        },
        Duration::ZERO,
    );
    assert_eq!(e.poll_action(), Some(Action::Pause));
    e.handle_failure(Duration::ZERO, "pause failed");
    assert_eq!(e.poll_action(), Some(Action::Resume));
}
