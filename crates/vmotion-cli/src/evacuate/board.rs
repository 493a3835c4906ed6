//! What `vmotion-evacuate` shows while it runs: on a terminal, one line per VM in flight
//! (its destination and `vmotion-send`'s progress line) under a totals line, redrawn in
//! place (`indicatif`); otherwise plain log lines, one per start, move and failure.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// An evacuation's progress display.
#[derive(Debug)]
pub struct Board {
    /// `None` off a terminal.
    live: Option<Live>,
    state: Mutex<Totals>,
}

#[derive(Debug)]
struct Live {
    multi: MultiProgress,
    totals: ProgressBar,
    vms: Mutex<BTreeMap<String, ProgressBar>>,
}

/// The counts on the totals line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    /// VMs to move.
    pub vms: usize,
    /// Moved.
    pub moved: usize,
    /// Given up on.
    pub failed: usize,
    /// Migrations running now.
    pub in_flight: usize,
}

impl Totals {
    /// The totals line.
    pub fn line(&self) -> String {
        let waiting = self
            .vms
            .saturating_sub(self.moved + self.failed + self.in_flight);
        format!(
            "{} of {} moved, {} in flight, {} waiting, {} failed",
            self.moved, self.vms, self.in_flight, waiting, self.failed
        )
    }
}

impl Board {
    /// A board for `vms` VMs: live on a terminal (standard error), log lines otherwise.
    pub fn new(vms: usize) -> Self {
        let live = std::io::stderr().is_terminal().then(|| Live::new(vms));
        Self::with(live, vms)
    }

    /// A board that only writes log lines.
    pub fn plain(vms: usize) -> Self {
        Self::with(None, vms)
    }

    fn with(live: Option<Live>, vms: usize) -> Self {
        Self {
            live,
            state: Mutex::new(Totals {
                vms,
                ..Totals::default()
            }),
        }
    }

    /// The counts now.
    pub fn totals(&self) -> Totals {
        self.totals_mut().clone()
    }

    fn totals_mut(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A migration of `vm` to `destination` starts.
    pub fn started(&self, vm: &str, destination: &str) {
        self.totals_mut().in_flight += 1;
        match &self.live {
            Some(live) => live.start(vm, destination),
            None => eprintln!("vmotion-evacuate: {vm} → {destination}"),
        }
        self.redraw();
    }

    /// `vmotion-send`'s progress for `vm` (the `progress` object of its
    /// `--progress json` lines).
    pub fn progress(&self, vm: &str, progress: &serde_json::Value) {
        if let Some(live) = &self.live {
            live.set(vm, &vm_line(progress));
        }
    }

    /// A message above the lines (or a log line).
    pub fn note(&self, message: &str) {
        match &self.live {
            Some(live) => {
                let _ = live.multi.println(format!("vmotion-evacuate: {message}"));
            }
            None => eprintln!("vmotion-evacuate: {message}"),
        }
    }

    /// One migration of `vm` ended: `moved`, or failed with `outcome` (and perhaps tried
    /// again: `last` is false then).
    pub fn ended(&self, vm: &str, moved: bool, last: bool, outcome: &str) {
        {
            let mut t = self.totals_mut();
            t.in_flight = t.in_flight.saturating_sub(1);
            if moved {
                t.moved += 1;
            } else if last {
                t.failed += 1;
            }
        }
        if let Some(live) = &self.live {
            live.finish(vm);
        }
        if !moved || self.live.is_some() {
            self.note(&format!("{vm}: {outcome}"));
        }
        self.redraw();
    }

    /// A VM that will not be tried at all (stopped before it started).
    pub fn skipped(&self) {
        self.totals_mut().failed += 1;
        self.redraw();
    }

    fn redraw(&self) {
        if let Some(live) = &self.live {
            live.totals.set_message(self.totals().line());
        }
    }

    /// Ends the live lines, leaving the final totals, before the table is printed.
    pub fn clear(&self) {
        if let Some(live) = &self.live {
            for (_, bar) in std::mem::take(&mut *live.bars()) {
                bar.finish_and_clear();
            }
            live.totals.finish_with_message(self.totals().line());
        }
    }
}

impl Live {
    fn new(vms: usize) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let totals = multi.add(ProgressBar::new_spinner());
        totals.set_style(style("{spinner} {elapsed_precise} {msg}"));
        totals.set_message(
            Totals {
                vms,
                ..Totals::default()
            }
            .line(),
        );
        totals.enable_steady_tick(Duration::from_millis(250));
        Self {
            multi,
            totals,
            vms: Mutex::new(BTreeMap::new()),
        }
    }

    fn bars(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ProgressBar>> {
        self.vms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn start(&self, vm: &str, destination: &str) {
        let bar = self.multi.add(ProgressBar::new_spinner());
        // Cut at the terminal's width: a wrapped line would break the redraw.
        bar.set_style(style("  {prefix:<28} {wide_msg}"));
        bar.set_prefix(format!("{vm} → {destination}"));
        bar.set_message("starting");
        if let Some(old) = self.bars().insert(vm.to_owned(), bar) {
            old.finish_and_clear();
        }
    }

    fn set(&self, vm: &str, line: &str) {
        if let Some(bar) = self.bars().get(vm) {
            bar.set_message(line.to_owned());
        }
    }

    fn finish(&self, vm: &str) {
        if let Some(bar) = self.bars().remove(vm) {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
    }
}

/// One VM's line from vmotion-send's progress: stage, iteration, sent of the guest's
/// size, what is left, rate, throttle.
pub fn vm_line(p: &serde_json::Value) -> String {
    let mb = |k: &str| p[k].as_f64().unwrap_or(0.0) / 1e6;
    format!(
        "{:<13} iter {:>2}  {:>7.1} MB sent of {:.0}, {:.1} MB left  {:>6.1} MB/s  throttle {}%",
        p["stage"].as_str().unwrap_or("?"),
        p["iteration"].as_u64().unwrap_or(0),
        mb("bytes_sent"),
        mb("guest_bytes"),
        mb("remaining_bytes"),
        mb("throughput_bytes_per_sec"),
        p["throttle_percent"].as_u64().unwrap_or(0),
    )
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_follow_starts_moves_and_failures() {
        let b = Board::plain(4);
        b.started("a", "d1");
        b.started("b", "d2");
        b.ended("a", true, true, "moved");
        // A failure that is tried again is not counted as failed.
        b.ended("b", false, false, "refused");
        b.started("b", "d3");
        b.ended("b", false, true, "refused");
        b.skipped();
        let t = b.totals();
        assert_eq!((t.moved, t.failed, t.in_flight), (1, 2, 0));
        assert_eq!(t.line(), "1 of 4 moved, 0 in flight, 1 waiting, 2 failed");
    }

    #[test]
    fn a_vm_line_shows_the_figures() {
        let p = serde_json::json!({
            "stage": "pre-copy", "iteration": 2, "bytes_sent": 12_500_000,
            "guest_bytes": 33_554_432, "remaining_bytes": 1_000_000,
            "throughput_bytes_per_sec": 8_400_000.0, "throttle_percent": 20,
        });
        assert_eq!(
            vm_line(&p),
            "pre-copy      iter  2     12.5 MB sent of 34, 1.0 MB left     8.4 MB/s  throttle 20%"
        );
    }
}
