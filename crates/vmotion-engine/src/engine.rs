//! The source side of a live migration as a state machine without I/O.
//!
//! ```text
//! setup ─▶ iteration 0 (all memory) ─▶ fetch dirty log ─▶ judge ─┬─▶ iteration n (dirty pages) ─▶ …
//!                                                                ├─▶ pause ─▶ final dirty log ─▶ final pages
//!                                                                │     ─▶ device state ─▶ Complete ─▶ Ready
//!                                                                │     ─▶ record "committed" ─▶ Commit ─▶ done
//!                                                                └─▶ limit: abort (VM keeps running) or force
//! any failure before "committed" is recorded ─▶ Abort to the destination, throttle off, resume ─▶ done
//! ```
//!
//! The driver loops: take every [`Action`] from [`SenderEngine::poll_action`] and carry it
//! out; when an action's result arrives, report it with the matching `handle_*` call,
//! passing the current time as a [`Duration`] since any fixed origin. Time, bandwidth
//! (bytes sent and how long it took) and dirty bitmaps are the only inputs, so every path
//! runs in tests without sockets or clocks (`tests/simulate.rs`).

use std::collections::VecDeque;
use std::time::Duration;

use crate::bitmap::{DirtyBitmap, PageRange};
use crate::convergence::{ConvergencePolicy, IterationStats, Limit, Verdict, judge, transfer_time};

/// What the engine needs to know about the guest and the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Guest memory in pages.
    pub guest_pages: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Convergence knobs.
    pub policy: ConvergencePolicy,
    /// The mover can track dirty pages. Without it the migration is a single cold pass:
    /// pause first, then copy everything.
    pub dirty_tracking: bool,
    /// Longest time from the pause to `Ready`; past it the migration aborts.
    pub switchover_timeout: Duration,
    /// Expected device state size, for the downtime estimate.
    pub device_state_estimate: u64,
}

/// The two ways a migration ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The VM runs at the destination; the source stays stopped for good.
    Committed,
    /// The VM runs at the source; the destination discards what it received.
    Aborted,
}

/// Why a migration aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbortReason {
    /// Pre-copy did not converge within a limit, and the policy says abort.
    Limit(Limit),
    /// `Ready` did not come within the switchover timeout.
    SwitchoverTimeout,
    /// The outcome could not be recorded (the key service refused), so the source keeps
    /// the VM.
    OutcomeNotRecorded,
    /// The driver reported a failure (connection lost, mover error, peer abort...).
    Failure(String),
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the mover's dirty log.
    StartDirtyLog,
    /// Send these pages, then call [`SenderEngine::handle_pages_sent`].
    SendPages {
        /// Iteration number (0 = full pass).
        iteration: u32,
        /// The pages, as ascending runs.
        ranges: Vec<PageRange>,
        /// The pass after the pause.
        final_pass: bool,
    },
    /// Fetch and clear the dirty log, then call [`SenderEngine::handle_dirty_log`].
    FetchDirtyLog,
    /// Throttle the guest to this share of vCPU time taken away (0 = none).
    SetThrottle(u8),
    /// Pause the VM, then call [`SenderEngine::handle_paused`].
    Pause,
    /// Save and send the device state, then call [`SenderEngine::handle_device_state_sent`].
    SendDeviceState,
    /// Send `Complete` with the totals; call [`SenderEngine::handle_ready`] on `Ready`.
    SendComplete,
    /// Record the outcome with the key service (durably), then call
    /// [`SenderEngine::handle_outcome_recorded`] for `Committed`. `Aborted` is best effort.
    RecordOutcome(Outcome),
    /// Send `Commit`: the source never runs this VM again.
    SendCommit,
    /// Tell the destination the migration is aborted.
    SendAbort(AbortReason),
    /// Resume the VM at the source.
    Resume,
    /// Stop the dirty log.
    StopDirtyLog,
}

/// An input the current phase does not accept: a driver bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input} is not expected while {phase}")]
pub struct UnexpectedInput {
    /// The phase.
    pub phase: &'static str,
    /// The input.
    pub input: &'static str,
}

/// Downtime, broken into its parts (cloud-hypervisor's `DowntimeContext` idea).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Downtime {
    /// Final dirty log and final pages.
    pub final_pages: Duration,
    /// Saving and sending the device state.
    pub device_state: Duration,
    /// From `Complete` to `Ready` (the destination's verification).
    pub ready_wait: Duration,
    /// Recording the outcome.
    pub outcome_record: Duration,
    /// Pause to `Commit`.
    pub total: Duration,
}

/// What happened, for the migration report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EngineReport {
    /// Pre-copy iterations (0 = full pass).
    pub iterations: Vec<IterationStats>,
    /// The pass after the pause.
    pub final_pass: Option<IterationStats>,
    /// Highest throttle applied, percent.
    pub max_throttle_percent: u8,
    /// The downtime the convergence estimate promised, when it stopped.
    pub expected_downtime: Option<Duration>,
    /// Measured downtime, when the VM was paused.
    pub downtime: Option<Downtime>,
    /// How it ended.
    pub outcome: Option<Outcome>,
    /// Why it aborted.
    pub abort_reason: Option<AbortReason>,
    /// Total time, start to end.
    pub total_time: Duration,
    /// Device state bytes sent.
    pub device_state_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Pre-copy iteration `n` is being sent.
    Sending(u32),
    /// Waiting for the dirty log after iteration `n`.
    Fetching(u32),
    /// Waiting for the pause.
    Pausing,
    /// Waiting for the last dirty log.
    FinalFetch,
    /// Sending the final pages.
    FinalSend,
    /// Sending the device state.
    DeviceState,
    /// `Complete` sent, waiting for `Ready`.
    AwaitReady,
    /// Recording `committed`.
    Recording,
    /// Ended.
    Done,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Sending(_) => "sending a pre-copy iteration",
            Self::Fetching(_) => "waiting for the dirty log",
            Self::Pausing => "pausing the VM",
            Self::FinalFetch => "waiting for the final dirty log",
            Self::FinalSend => "sending the final pages",
            Self::DeviceState => "sending the device state",
            Self::AwaitReady => "waiting for Ready",
            Self::Recording => "recording the outcome",
            Self::Done => "done",
        }
    }
}

/// The source-side engine. See the module documentation for the loop a driver runs.
#[derive(Debug)]
pub struct SenderEngine {
    config: EngineConfig,
    phase: Phase,
    actions: VecDeque<Action>,
    throttle: u8,
    dirty_log_started: bool,
    start: Duration,
    step_started: Duration,
    paused_at: Option<Duration>,
    downtime: Downtime,
    report: EngineReport,
    /// The dirty log fetched for the last judgement. Fetching clears the mover's log, so
    /// when the verdict is stop-and-copy these pages must still go in the final pass.
    pending: Option<DirtyBitmap>,
}

impl SenderEngine {
    /// Starts a migration at `now`.
    pub fn new(config: EngineConfig, now: Duration) -> Self {
        let mut e = Self {
            phase: Phase::Sending(0),
            actions: VecDeque::new(),
            throttle: 0,
            dirty_log_started: false,
            start: now,
            step_started: now,
            paused_at: None,
            downtime: Downtime::default(),
            report: EngineReport::default(),
            pending: None,
            config,
        };
        let all = DirtyBitmap::all(e.config.guest_pages).ranges().collect();
        if e.config.dirty_tracking {
            e.dirty_log_started = true;
            e.actions.push_back(Action::StartDirtyLog);
            e.actions.push_back(Action::SendPages {
                iteration: 0,
                ranges: all,
                final_pass: false,
            });
        } else {
            // Cold migration: pause, then one pass over everything.
            e.phase = Phase::Pausing;
            e.actions.push_back(Action::Pause);
        }
        e
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// How it ended, once it has.
    pub fn outcome(&self) -> Option<Outcome> {
        self.report.outcome
    }

    /// The report so far.
    pub fn report(&self) -> &EngineReport {
        &self.report
    }

    /// The throttle in force, percent.
    pub fn throttle_percent(&self) -> u8 {
        self.throttle
    }

    fn unexpected(&self, input: &'static str) -> UnexpectedInput {
        UnexpectedInput {
            phase: self.phase.name(),
            input,
        }
    }

    /// The pages of the last `SendPages` are on the wire: `pages` pages, `bytes` bytes.
    pub fn handle_pages_sent(
        &mut self,
        now: Duration,
        pages: u64,
        bytes: u64,
    ) -> Result<(), UnexpectedInput> {
        let stats = |iteration, throttle_percent| IterationStats {
            iteration,
            pages,
            bytes,
            duration: now.saturating_sub(self.step_started),
            dirty_after: 0,
            throttle_percent,
        };
        match self.phase {
            Phase::Sending(n) => {
                self.report.iterations.push(stats(n, self.throttle));
                self.phase = Phase::Fetching(n);
                self.step_started = now;
                self.actions.push_back(Action::FetchDirtyLog);
            }
            Phase::FinalSend => {
                let n = u32::try_from(self.report.iterations.len()).unwrap_or(u32::MAX);
                self.report.final_pass = Some(stats(n, self.throttle));
                self.downtime.final_pages = now.saturating_sub(self.step_started);
                self.phase = Phase::DeviceState;
                self.step_started = now;
                self.actions.push_back(Action::SendDeviceState);
            }
            _ => return Err(self.unexpected("pages sent")),
        }
        Ok(())
    }

    /// The dirty log, fetched and cleared.
    pub fn handle_dirty_log(
        &mut self,
        now: Duration,
        dirty: &DirtyBitmap,
    ) -> Result<(), UnexpectedInput> {
        if dirty.pages() != self.config.guest_pages
            && matches!(self.phase, Phase::Fetching(_) | Phase::FinalFetch)
        {
            // A short bitmap would silently drop dirty pages: refuse to go on.
            self.abort(
                now,
                AbortReason::Failure(format!(
                    "the dirty log covers {} pages; the guest has {}",
                    dirty.pages(),
                    self.config.guest_pages
                )),
            );
            return Ok(());
        }
        match self.phase {
            Phase::Fetching(n) => {
                let last = self
                    .report
                    .iterations
                    .last_mut()
                    .expect("an iteration was sent");
                last.dirty_after = dirty.count();
                let verdict = judge(
                    &self.config.policy,
                    self.config.page_size,
                    self.config.device_state_estimate,
                    &self.report.iterations,
                    self.throttle,
                    now.saturating_sub(self.start),
                );
                self.step_started = now;
                match verdict {
                    Verdict::StopAndCopy { expected_downtime }
                    | Verdict::LimitReached {
                        force: true,
                        expected_downtime,
                        ..
                    } => {
                        self.report.expected_downtime = Some(expected_downtime);
                        self.pending = Some(dirty.clone());
                        self.stop_and_copy();
                    }
                    Verdict::LimitReached { limit, .. } => {
                        self.abort(now, AbortReason::Limit(limit));
                    }
                    Verdict::Continue { throttle_percent } => {
                        if throttle_percent != self.throttle {
                            self.throttle = throttle_percent;
                            self.report.max_throttle_percent =
                                self.report.max_throttle_percent.max(throttle_percent);
                            self.actions
                                .push_back(Action::SetThrottle(throttle_percent));
                        }
                        self.phase = Phase::Sending(n + 1);
                        self.actions.push_back(Action::SendPages {
                            iteration: n + 1,
                            ranges: dirty.ranges().collect(),
                            final_pass: false,
                        });
                    }
                }
            }
            Phase::FinalFetch => {
                // Everything judged dirty before the pause, plus what was written since.
                let mut all = self.pending.take().unwrap_or_else(|| dirty.clone());
                all.union_with(dirty);
                self.phase = Phase::FinalSend;
                self.actions.push_back(Action::SendPages {
                    iteration: u32::try_from(self.report.iterations.len()).unwrap_or(u32::MAX),
                    ranges: all.ranges().collect(),
                    final_pass: true,
                });
            }
            _ => return Err(self.unexpected("a dirty log")),
        }
        Ok(())
    }

    fn stop_and_copy(&mut self) {
        self.phase = Phase::Pausing;
        self.actions.push_back(Action::Pause);
    }

    /// The VM is paused.
    pub fn handle_paused(&mut self, now: Duration) -> Result<(), UnexpectedInput> {
        if self.phase != Phase::Pausing {
            return Err(self.unexpected("paused"));
        }
        self.paused_at = Some(now);
        self.step_started = now;
        if self.dirty_log_started {
            self.phase = Phase::FinalFetch;
            self.actions.push_back(Action::FetchDirtyLog);
        } else {
            self.phase = Phase::FinalSend;
            self.actions.push_back(Action::SendPages {
                iteration: 0,
                ranges: DirtyBitmap::all(self.config.guest_pages).ranges().collect(),
                final_pass: true,
            });
        }
        Ok(())
    }

    /// The device state is sent (`bytes` long).
    pub fn handle_device_state_sent(
        &mut self,
        now: Duration,
        bytes: u64,
    ) -> Result<(), UnexpectedInput> {
        if self.phase != Phase::DeviceState {
            return Err(self.unexpected("device state sent"));
        }
        self.report.device_state_bytes = bytes;
        self.downtime.device_state = now.saturating_sub(self.step_started);
        self.step_started = now;
        self.phase = Phase::AwaitReady;
        self.actions.push_back(Action::SendComplete);
        Ok(())
    }

    /// The destination answered `Ready`.
    pub fn handle_ready(&mut self, now: Duration) -> Result<(), UnexpectedInput> {
        if self.phase != Phase::AwaitReady {
            return Err(self.unexpected("Ready"));
        }
        self.downtime.ready_wait = now.saturating_sub(self.step_started);
        self.step_started = now;
        self.phase = Phase::Recording;
        self.actions
            .push_back(Action::RecordOutcome(Outcome::Committed));
        Ok(())
    }

    /// The `committed` record: `true` once it is durable, `false` if it definitely was not
    /// recorded (the service refused). If the result is unknown (a timeout), read the
    /// outcome back from the key service before calling this.
    pub fn handle_outcome_recorded(
        &mut self,
        now: Duration,
        recorded: bool,
    ) -> Result<(), UnexpectedInput> {
        if self.phase != Phase::Recording {
            return Err(self.unexpected("outcome recorded"));
        }
        if !recorded {
            self.abort(now, AbortReason::OutcomeNotRecorded);
            return Ok(());
        }
        self.downtime.outcome_record = now.saturating_sub(self.step_started);
        self.downtime.total = now.saturating_sub(self.paused_at.unwrap_or(now));
        self.report.downtime = Some(self.downtime);
        self.actions.push_back(Action::SendCommit);
        if self.dirty_log_started {
            self.actions.push_back(Action::StopDirtyLog);
        }
        self.finish(now, Outcome::Committed);
        Ok(())
    }

    /// Something failed (connection, mover, peer abort). Before `committed` is recorded
    /// the migration aborts and the source resumes; after it, nothing changes: the VM
    /// belongs to the destination, which learns the outcome from the key service if
    /// `Commit` never reaches it.
    ///
    /// While `committed` is being recorded nothing can be decided: the record may land.
    /// The failure is ignored then, and [`handle_outcome_recorded`] settles it.
    ///
    /// [`handle_outcome_recorded`]: Self::handle_outcome_recorded
    pub fn handle_failure(&mut self, now: Duration, reason: impl Into<String>) {
        if !matches!(self.phase, Phase::Done | Phase::Recording) {
            self.abort(now, AbortReason::Failure(reason.into()));
        }
    }

    /// When the switchover must be over (`Ready` received), once the VM is paused.
    pub fn switchover_deadline(&self) -> Option<Duration> {
        let waiting = matches!(
            self.phase,
            Phase::FinalFetch | Phase::FinalSend | Phase::DeviceState | Phase::AwaitReady
        );
        waiting
            .then_some(self.paused_at)
            .flatten()
            .map(|p| p + self.config.switchover_timeout)
    }

    /// Checks timers: the switchover timeout runs from the pause to `Ready`.
    pub fn handle_tick(&mut self, now: Duration) {
        let waiting = matches!(
            self.phase,
            Phase::FinalFetch | Phase::FinalSend | Phase::DeviceState | Phase::AwaitReady
        );
        if let (true, Some(paused_at)) = (waiting, self.paused_at)
            && now.saturating_sub(paused_at) >= self.config.switchover_timeout
        {
            self.abort(now, AbortReason::SwitchoverTimeout);
        }
    }

    /// The downtime a stop-and-copy would cost right now, by the last iteration's
    /// bandwidth (for progress displays).
    pub fn estimated_downtime(&self) -> Option<Duration> {
        let last = self.report.iterations.last()?;
        let bytes = last
            .dirty_after
            .saturating_mul(self.config.page_size)
            .saturating_add(self.config.device_state_estimate);
        Some(transfer_time(bytes, last.bandwidth()))
    }

    fn abort(&mut self, now: Duration, reason: AbortReason) {
        // Anything queued for the migration is void now. The VM comes first: resume it
        // before telling anyone (a stuck network write must not keep it paused), and also
        // after a failed pause, which may have stopped it partway. Resuming before the
        // destination hears Abort is safe: it resumes only on Commit or a recorded
        // "committed", neither of which can happen once the engine is done.
        let pausing = self.phase == Phase::Pausing;
        self.actions.clear();
        if let Some(paused_at) = self.paused_at {
            self.downtime.total = now.saturating_sub(paused_at);
            self.report.downtime = Some(self.downtime);
            self.actions.push_back(Action::Resume);
        } else if pausing {
            self.actions.push_back(Action::Resume);
        }
        if self.throttle != 0 {
            self.throttle = 0;
            self.actions.push_back(Action::SetThrottle(0));
        }
        self.actions.push_back(Action::SendAbort(reason.clone()));
        if self.dirty_log_started {
            self.actions.push_back(Action::StopDirtyLog);
        }
        self.actions
            .push_back(Action::RecordOutcome(Outcome::Aborted));
        self.report.abort_reason = Some(reason);
        self.finish(now, Outcome::Aborted);
    }

    fn finish(&mut self, now: Duration, outcome: Outcome) {
        self.phase = Phase::Done;
        self.report.outcome = Some(outcome);
        self.report.total_time = now.saturating_sub(self.start);
    }
}
