//! The source QEMU of `vmotion-send --qemu`: its migration driven over QMP.
//!
//! Blocking (QMP is a line protocol on a Unix socket, [`vmotion_qemu::Qmp`]): the sender
//! runs it on a thread of its own beside the tunnel. The order is fixed so that nothing
//! leaves QEMU before vmotion has negotiated: [`QemuSource::connect`] (pre-flight),
//! [`QemuSource::configure`], the tunnel's negotiation, then [`QemuSource::migrate`] and
//! [`QemuSource::follow`] until QEMU says `completed`, `failed` or `cancelled`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmotion::{Progress, Stage};
use vmotion_engine::{ConvergencePolicy, OnLimit};
use vmotion_qemu::Qmp;

/// How often [`QemuSource::follow`] asks QEMU.
const POLL: Duration = Duration::from_millis(200);
/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// QEMU's `max-bandwidth` for "unlimited" (its default is 128 MiB/s): 1 TiB/s.
const UNLIMITED_BANDWIDTH: u64 = 1 << 40;
/// QEMU's largest `downtime-limit` (2,000 s): what forcing the switchover sets.
const FORCE_DOWNTIME_MS: u64 = 2_000_000;

/// How QEMU should migrate, from the VM's policy and the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuSettings {
    /// Connections: 1 is QEMU's single channel; more turns multifd on with that many
    /// channels.
    pub channels: u16,
    /// `max-bandwidth` in bytes per second; `None`: unlimited.
    pub max_bandwidth: Option<u64>,
    /// The policy's convergence knobs: `max_downtime` is QEMU's `downtime-limit`,
    /// auto-converge its `auto-converge` capability and `cpu-throttle-*` parameters;
    /// past `max_iterations` or `max_total_time` the sender cancels QEMU's migration
    /// (`on_limit = "abort"`) or raises the downtime limit so that QEMU switches over
    /// (`"force"`).
    pub convergence: ConvergencePolicy,
}

impl QemuSettings {
    /// The connections QEMU opens to the tunnel: the main channel, and one per multifd
    /// channel.
    pub fn connections(&self) -> u16 {
        if self.channels > 1 {
            self.channels.saturating_add(1)
        } else {
            1
        }
    }
}

/// How QEMU's migration ended, with its own figures.
#[derive(Debug, Clone)]
pub struct QemuOutcome {
    /// `completed`, `failed` or `cancelled`.
    pub status: String,
    /// QEMU's last `query-migrate` object.
    pub info: Value,
    /// The convergence limit the migration reached, if it did (then it was cancelled,
    /// or forced to switch over).
    pub limit: Option<String>,
    /// Whether `migrate_cancel` was sent (QEMU may then end `failed` rather than
    /// `cancelled`, when an I/O error of the cancel wins the race).
    pub cancel_sent: bool,
}

impl QemuOutcome {
    /// QEMU's `error-desc`, if it gave one.
    pub fn error(&self) -> Option<&str> {
        self.info.get("error-desc").and_then(Value::as_str)
    }

    /// QEMU's own figures for the report: times in ms, RAM bytes and iterations.
    pub fn figures(&self) -> Value {
        let i = &self.info;
        let ram = &i["ram"];
        json!({
            "status": self.status,
            "total_time_ms": i.get("total-time"),
            "downtime_ms": i.get("downtime"),
            "setup_time_ms": i.get("setup-time"),
            "transferred_bytes": ram.get("transferred"),
            "total_bytes": ram.get("total"),
            "iterations": ram.get("dirty-sync-count"),
            "mbps": ram.get("mbps"),
            "error": self.error(),
            "limit": self.limit,
        })
    }

    /// One line with QEMU's figures.
    pub fn summary(&self) -> String {
        let ms = |k: &str| {
            self.info
                .get(k)
                .and_then(Value::as_u64)
                .map_or_else(|| "-".to_owned(), |v| format!("{v} ms"))
        };
        let ram = &self.info["ram"];
        format!(
            "QEMU: migration {}: total {}, downtime {}, setup {}, {:.1} MiB transferred in {} iteration(s)",
            self.status,
            ms("total-time"),
            ms("downtime"),
            ms("setup-time"),
            ram["transferred"].as_u64().unwrap_or(0) as f64 / f64::from(1 << 20),
            ram["dirty-sync-count"].as_u64().unwrap_or(0),
        )
    }
}

/// A running source QEMU, reached over its QMP socket.
pub struct QemuSource {
    qmp: Qmp,
}

impl std::fmt::Debug for QemuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuSource").finish_non_exhaustive()
    }
}

impl QemuSource {
    /// Connects to QMP at `path` and checks that the VM can be migrated now: it runs (or
    /// is paused by its operator) and no migration of it is under way.
    pub fn connect(path: &Path) -> Result<Self, String> {
        let mut qmp = Qmp::connect(path).map_err(|e| {
            format!(
                "QMP at {}: {e} (QEMU serves one client per QMP socket: give vmotion-send \
                 a -qmp socket of its own)",
                path.display()
            )
        })?;
        qmp.set_timeout(QMP_TIMEOUT);
        let status = qmp.query_status().map_err(|e| e.to_string())?;
        if !matches!(status.as_str(), "running" | "paused") {
            return Err(format!(
                "the VM behind {} is `{status}`: only a running (or paused) VM can be migrated",
                path.display()
            ));
        }
        let migration = qmp.migration_status().map_err(|e| e.to_string())?;
        if let Some(s) = migration
            .filter(|s| !matches!(s.as_str(), "completed" | "failed" | "cancelled" | "none"))
        {
            return Err(format!(
                "the VM behind {} is already migrating (QEMU's migration status: {s})",
                path.display()
            ));
        }
        Ok(Self { qmp })
    }

    /// Sets QEMU's capabilities and parameters: multifd with `channels` when more than
    /// one, the return path on (the destination's verdict comes back through the tunnel,
    /// so `completed` means the destination loaded the VM), the bandwidth cap and the
    /// downtime limit.
    pub fn configure(&mut self, s: &QemuSettings) -> Result<(), String> {
        let multifd = s.channels > 1;
        let auto = s.convergence.auto_converge;
        self.qmp
            .set_capabilities(&[
                ("multifd", multifd),
                ("return-path", true),
                ("auto-converge", auto.enabled),
            ])
            .map_err(|e| e.to_string())?;
        let mut params = json!({
            "max-bandwidth": s.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH),
            "downtime-limit": u64::try_from(s.convergence.max_downtime.as_millis()).unwrap_or(FORCE_DOWNTIME_MS).min(FORCE_DOWNTIME_MS),
            "cpu-throttle-initial": auto.initial_percent.clamp(1, 99),
            "cpu-throttle-increment": auto.step_percent.clamp(1, 99),
            "max-cpu-throttle": auto.max_percent.clamp(1, 99),
            "throttle-trigger-threshold": auto.trigger_percent.clamp(1, 100),
        });
        if multifd {
            params["multifd-channels"] = json!(s.channels);
        }
        self.qmp.set_parameters(params).map_err(|e| e.to_string())
    }

    /// Starts QEMU's migration to `uri` (the tunnel's local socket).
    pub fn migrate(&mut self, uri: &str) -> Result<(), String> {
        self.qmp.migrate(uri).map_err(|e| e.to_string())
    }

    /// Follows the migration until QEMU ends it, showing progress. When `cancel` is set,
    /// or a convergence limit of `policy` is reached with `on_limit = "abort"`, it sends
    /// `migrate_cancel` (once) and goes on until QEMU says `cancelled` (or `completed`,
    /// if it was too late); with `"force"` it lifts the downtime limit instead. A lost
    /// QMP connection is an error: then nothing here knows how the migration ended.
    pub fn follow(
        &mut self,
        policy: &ConvergencePolicy,
        cancel: &Arc<AtomicBool>,
        show: &dyn Fn(&Progress),
    ) -> Result<QemuOutcome, String> {
        let started = Instant::now();
        let mut cancelled = false;
        let mut limit = None;
        loop {
            if cancel.load(Ordering::Relaxed) && !cancelled {
                cancelled = true;
                self.cancel()?;
            }
            let info = self
                .qmp
                .query_migrate()
                .map_err(|e| format!("query-migrate: {e}"))?;
            let status = info
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_owned();
            if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                return Ok(QemuOutcome {
                    status,
                    info,
                    limit,
                    cancel_sent: cancelled,
                });
            }
            let p = progress(&info, started.elapsed());
            if limit.is_none()
                && let Some(reached) = limit_reached(policy, &p)
            {
                tracing::warn!(limit = %reached, on_limit = ?policy.on_limit, "QEMU's migration reached a convergence limit");
                if policy.on_limit == OnLimit::Force {
                    self.qmp
                        .set_parameters(json!({ "downtime-limit": FORCE_DOWNTIME_MS }))
                        .map_err(|e| format!("forcing the switchover: {e}"))?;
                } else if !cancelled {
                    cancelled = true;
                    self.cancel()?;
                }
                limit = Some(reached);
            }
            show(&p);
            std::thread::sleep(POLL);
        }
    }

    fn cancel(&mut self) -> Result<(), String> {
        self.qmp
            .execute("migrate_cancel", None)
            .map(drop)
            .map_err(|e| format!("migrate_cancel: {e}"))
    }

    /// The VM's run state now (`running` after a failed or cancelled migration).
    pub fn status(&mut self) -> Result<String, String> {
        self.qmp.query_status().map_err(|e| e.to_string())
    }
}

/// The convergence limit `p` is past, if any: more iterations than `max_iterations`
/// after the first pass, or pre-copy longer than `max_total_time`.
fn limit_reached(policy: &ConvergencePolicy, p: &Progress) -> Option<String> {
    if p.stage != Stage::PreCopy {
        return None;
    }
    if p.iteration > policy.max_iterations {
        return Some(format!(
            "not converged after {} iterations (max_iterations)",
            policy.max_iterations
        ));
    }
    (p.elapsed > policy.max_total_time).then(|| {
        format!(
            "not converged within {} s (max_total_time)",
            policy.max_total_time.as_secs()
        )
    })
}

/// QEMU's `query-migrate` as vmotion's progress report.
pub fn progress(info: &Value, elapsed: Duration) -> Progress {
    let ram = &info["ram"];
    let n = |k: &str| ram.get(k).and_then(Value::as_u64).unwrap_or(0);
    let stage = match info.get("status").and_then(Value::as_str) {
        Some("device" | "pre-switchover") => Stage::StopAndCopy,
        Some("completed") => Stage::Done,
        _ => Stage::PreCopy,
    };
    let throughput = ram.get("mbps").and_then(Value::as_f64).unwrap_or(0.0) * 1e6 / 8.0;
    let remaining = n("remaining");
    let eta = (throughput > 0.0).then(|| Duration::from_secs_f64(remaining as f64 / throughput));
    Progress {
        stage,
        iteration: u32::try_from(n("dirty-sync-count").saturating_sub(1)).unwrap_or(u32::MAX),
        bytes_sent: n("transferred"),
        guest_bytes: n("total"),
        remaining_bytes: remaining,
        dirty_rate_pages: ram
            .get("dirty-pages-rate")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        throughput,
        throttle_percent: info
            .get("cpu-throttle-percentage")
            .and_then(Value::as_u64)
            .map_or(0, |p| u8::try_from(p).unwrap_or(100)),
        elapsed,
        eta,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_becomes_a_progress_report() {
        let info = json!({
            "status": "active",
            "cpu-throttle-percentage": 30,
            "ram": { "transferred": 5_000_000, "total": 268_435_456, "remaining": 2_000_000,
                     "dirty-sync-count": 3, "mbps": 800.0, "dirty-pages-rate": 1234 }
        });
        let p = progress(&info, Duration::from_secs(2));
        assert_eq!(p.stage, Stage::PreCopy);
        assert_eq!(p.iteration, 2);
        assert_eq!(
            (p.bytes_sent, p.guest_bytes, p.remaining_bytes),
            (5_000_000, 268_435_456, 2_000_000)
        );
        assert_eq!(p.throttle_percent, 30);
        assert!((p.throughput - 100e6).abs() < 1.0);
        assert_eq!(p.eta, Some(Duration::from_millis(20)));
        let device = progress(&json!({"status": "device"}), Duration::ZERO);
        assert_eq!((device.stage, device.eta), (Stage::StopAndCopy, None));
    }

    #[test]
    fn a_limit_is_reached_in_pre_copy_only() {
        let policy = ConvergencePolicy {
            max_iterations: 3,
            max_total_time: Duration::from_secs(10),
            ..ConvergencePolicy::default()
        };
        let at = |status: &str, syncs: u64, secs| {
            progress(
                &json!({"status": status, "ram": {"dirty-sync-count": syncs}}),
                Duration::from_secs(secs),
            )
        };
        assert_eq!(limit_reached(&policy, &at("active", 4, 1)), None);
        assert!(
            limit_reached(&policy, &at("active", 5, 1))
                .unwrap()
                .contains("3 iterations")
        );
        assert!(
            limit_reached(&policy, &at("active", 1, 11))
                .unwrap()
                .contains("10 s")
        );
        assert_eq!(limit_reached(&policy, &at("device", 9, 99)), None);
    }

    #[test]
    fn multifd_adds_the_main_channel() {
        let s = |channels| QemuSettings {
            channels,
            max_bandwidth: None,
            convergence: ConvergencePolicy::default(),
        };
        assert_eq!(s(1).connections(), 1);
        assert_eq!(s(2).connections(), 3);
    }
}
