//! What a migration reports.

use std::time::Duration;

use vmotion_engine::EngineReport;
use vmotion_proto::{MigrationId, Mode};

/// How long each phase took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Phases {
    /// Key issuance, handshake and opening the data connections.
    pub setup: Duration,
    /// Pre-copy iterations, while the VM ran.
    pub precopy: Duration,
    /// Pause to commit (the downtime).
    pub switchover: Duration,
    /// `Commit` to the destination's claim known here (the source's paused copy is kept
    /// until then).
    pub claim: Duration,
}

/// How the source knows the destination holds the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimEvidence {
    /// The arbiter's record says the destination claimed it (`committed → claimed`).
    Arbiter,
    /// No arbiter: the destination's `Claimed` frame said so (sealed with the
    /// migration's keys when encrypted).
    Destination,
}

impl ClaimEvidence {
    /// For reports: what is known.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Arbiter => "recorded by the arbiter",
            Self::Destination => "announced by the destination",
        }
    }
}

/// The source's account of a committed migration.
#[derive(Debug, Clone)]
pub struct MigrationReport {
    /// The migration id.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm_name: String,
    /// Encrypted, or plaintext with the reason (a downgrade reason is a warning).
    pub mode: Mode,
    /// Data streams used.
    pub streams: u16,
    /// Phases, iterations, throttle, downtime broken into parts.
    pub engine: EngineReport,
    /// Bytes put on the data connections (headers and trailers included).
    pub bytes_sent: u64,
    /// Key epochs used on the busiest stream (1 = no key update).
    pub epochs: u32,
    /// Start to commit.
    pub total_time: Duration,
    /// The phases.
    pub phases: Phases,
    /// How this side knows the destination claimed the VM.
    pub claim: ClaimEvidence,
    /// This side had no key at all ([`crate::KeySource::None`]): that, not the destination,
    /// is why a downgraded migration went plaintext.
    pub keyless: bool,
}

impl MigrationReport {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        migration_id: MigrationId,
        vm_name: &str,
        mode: Mode,
        streams: u16,
        engine: EngineReport,
        bytes_sent: u64,
        max_epoch: u32,
        total_time: Duration,
        setup: Duration,
        claim: (ClaimEvidence, Duration),
    ) -> Self {
        let switchover = engine.downtime.map(|d| d.total).unwrap_or_default();
        let phases = Phases {
            setup,
            precopy: engine.total_time.saturating_sub(switchover),
            switchover,
            claim: claim.1,
        };
        Self {
            phases,
            claim: claim.0,
            keyless: false,
            migration_id,
            vm_name: vm_name.to_owned(),
            mode,
            streams,
            engine,
            bytes_sent,
            epochs: max_epoch.saturating_add(1),
            total_time,
        }
    }

    /// Average throughput over the whole migration, bytes per second.
    pub fn throughput(&self) -> f64 {
        self.bytes_sent as f64 / self.total_time.as_secs_f64().max(1e-9)
    }

    /// A few lines for people.
    pub fn summary(&self) -> String {
        let mode = match self.mode {
            Mode::Encrypted(_) => "encrypted (AES-256-GCM)".to_owned(),
            Mode::Plaintext(r) if self.keyless && r.is_downgrade() => {
                "PLAINTEXT: this host has no key (no key service), so nothing could be encrypted"
                    .to_owned()
            }
            Mode::Plaintext(r) => format!("PLAINTEXT: {r}"),
        };
        let downtime = self.engine.downtime.map_or_else(
            || "-".to_owned(),
            |d| format!("{:.1} ms", d.total.as_secs_f64() * 1e3),
        );
        format!(
            "migration {} of {}: committed, {mode}\n  {} iterations + final pass, {:.1} MB in {:.2} s ({:.0} MB/s), downtime {downtime}, max throttle {} %, {} key epoch(s), {} stream(s)\n  setup {:.0} ms, pre-copy {:.0} ms, switchover {:.1} ms, claim {:.1} ms ({})",
            self.migration_id,
            self.vm_name,
            self.engine.iterations.len(),
            self.bytes_sent as f64 / 1e6,
            self.total_time.as_secs_f64(),
            self.throughput() / 1e6,
            self.engine.max_throttle_percent,
            self.epochs,
            self.streams,
            self.phases.setup.as_secs_f64() * 1e3,
            self.phases.precopy.as_secs_f64() * 1e3,
            self.phases.switchover.as_secs_f64() * 1e3,
            self.phases.claim.as_secs_f64() * 1e3,
            self.claim.as_str(),
        )
    }
}
