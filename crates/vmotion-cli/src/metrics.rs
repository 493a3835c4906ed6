//! Prometheus metrics of `vmotion-recv` (`--metrics ADDR`): OpenMetrics text at
//! `GET /metrics`, from the `prometheus-client` crate.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `vmotion_migrations` | counter | `kind` (memory, tunnel), `result`, `mode` | migrations that ended here: `succeeded` (the guest claimed and running here), `unsettled` (kept paused until its record settles), `resume_failed`, `tunnel_closed`, `refused` (before any page), `failed` |
//! | `vmotion_migrations_in_flight` | gauge | | VMs arriving now |
//! | `vmotion_migration_data_processed_bytes` | counter | | guest payload bytes received (as KubeVirt's `kubevirt_vmi_migration_data_processed_bytes`) |
//! | `vmotion_migration_pages` | counter | | guest pages received, resends included |
//! | `vmotion_tunnel_bytes` | counter | `direction` (to_destination, from_destination) | bytes carried by tunnels |
//!
//! [`vmotion_metrics::serve`] answers the scrapes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use vmotion::{Finished, Incoming, ReceiveOutcome};
use vmotion_proto::Mode;

/// The labels of `vmotion_migrations`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    /// memory or tunnel.
    pub kind: String,
    /// How it ended.
    pub result: String,
    /// encrypted, plaintext, or unknown (it ended before the negotiation).
    pub mode: String,
}

/// The labels of `vmotion_tunnel_bytes`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// to_destination or from_destination.
    pub direction: String,
}

/// What `vmotion-recv` counts.
#[derive(Debug)]
pub struct RecvMetrics {
    registry: Registry,
    migrations: Family<MigrationLabels, Counter>,
    in_flight: Gauge,
    data_bytes: Counter,
    pages: Counter,
    tunnel_bytes: Family<DirectionLabels, Counter>,
}

impl Default for RecvMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn mode_label(mode: Mode) -> &'static str {
    crate::mode_fields(mode).0
}

impl RecvMetrics {
    /// Every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vmotion");
        let (migrations, in_flight) = (Family::default(), Gauge::default());
        let (data_bytes, pages, tunnel_bytes) =
            (Counter::default(), Counter::default(), Family::default());
        registry.register(
            "migrations",
            "Migrations that ended here, by kind, result and mode",
            migrations.clone(),
        );
        registry.register(
            "migrations_in_flight",
            "VMs arriving now",
            in_flight.clone(),
        );
        registry.register(
            "migration_data_processed_bytes",
            "Guest payload bytes received",
            data_bytes.clone(),
        );
        registry.register(
            "migration_pages",
            "Guest pages received, resends included",
            pages.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Bytes carried by tunnels, by direction",
            tunnel_bytes.clone(),
        );
        Self {
            registry,
            migrations,
            in_flight,
            data_bytes,
            pages,
            tunnel_bytes,
        }
    }

    fn count(&self, kind: &str, result: &str, mode: &str) {
        self.migrations
            .get_or_create(&MigrationLabels {
                kind: kind.into(),
                result: result.into(),
                mode: mode.into(),
            })
            .inc();
    }

    /// Counts a migration that ended here.
    pub fn finished<S>(&self, f: &Finished<S>) {
        match &f.result {
            Ok(Incoming::Vm(report, _)) => {
                let result = match report.outcome {
                    ReceiveOutcome::Committed => "succeeded",
                    ReceiveOutcome::CommittedNotResumed(_) => "resume_failed",
                    ReceiveOutcome::Unsettled(_) => "unsettled",
                };
                self.count("memory", result, mode_label(report.mode));
                self.data_bytes.inc_by(report.bytes);
                self.pages.inc_by(report.pages);
            }
            Ok(Incoming::Tunnel(report)) => {
                self.count("tunnel", "tunnel_closed", mode_label(report.mode));
                for (direction, bytes) in [
                    ("to_destination", report.bytes_to_destination),
                    ("from_destination", report.bytes_from_destination),
                ] {
                    self.tunnel_bytes
                        .get_or_create(&DirectionLabels {
                            direction: direction.into(),
                        })
                        .inc_by(bytes);
                }
            }
            Err(e) => {
                let result = if e.is_refusal() { "refused" } else { "failed" };
                self.count("any", result, "unknown");
            }
        }
    }

    /// The metrics as OpenMetrics text, with `in_flight` VMs arriving now.
    pub fn render(&self, in_flight: usize) -> String {
        self.in_flight
            .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        vmotion_metrics::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_every_metric() {
        let m = RecvMetrics::new();
        m.count("memory", "succeeded", "encrypted");
        let text = m.render(2);
        for name in [
            "vmotion_migrations_total{kind=\"memory\",result=\"succeeded\",mode=\"encrypted\"} 1",
            "vmotion_migrations_in_flight 2",
            "vmotion_migration_data_processed_bytes_total 0",
            "vmotion_migration_pages_total 0",
            "# EOF",
        ] {
            assert!(text.contains(name), "{name} in\n{text}");
        }
    }
}
