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
//! | `vmotion_migration_downtime_seconds` | histogram | | guests resumed here: from the stop-and-copy pass's start marker arriving to the guest running here (the source paused it one network delay earlier) |
//! | `vmotion_migration_iterations` | histogram | | pre-copy iterations of each verified guest, the stop-and-copy pass included |
//! | `vmotion_migration_duration_seconds` | histogram | | guests verified here: handshake to the end of the switchover |
//! | `vmotion_migration_throughput_bytes_per_second` | histogram | | the same guests: payload bytes over that time |
//! | `vmotion_migration_key_epochs` | histogram | `kind` | key epochs used (1 = the key was never updated; a stream updates its key before its sequence space runs out) |
//! | `vmotion_migration_refusals` | counter | `reason` | migrations refused before any page (`policy_requires_encryption`, `receiver_requires_encryption`, `preflight`, …) |
//! | `vmotion_handshake_failures` | counter | `kind` | migrations that failed in the handshake (not refusals): `key_confirmation_failed` (the peer does not hold the key), `key_unavailable`, `timeout`, `closed`, `decode_error`, … |
//! | `vmotion_connections_dropped` | gauge | `kind` | connections dropped before any migration began, since the daemon started: `no_first_frame` (closed, silent for 5 s, or no frame header), `malformed_hello`, `duplicate_migration`, `malformed_stream_bind`, `unknown_stream_bind`, `not_a_migration` |
//!
//! The source's auto-converge throttle is not here: the destination is never told it.
//! `vmotion-send` reports it (`throttle_percent` per iteration and `max_throttle_percent` in
//! `--json`).
//!
//! [`vmotion_metrics::serve`] answers the scrapes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use vmotion::{Dropped, Finished, Incoming, MigrateError, ReceiveOutcome, ReceiveReport};
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

/// One label, `reason` or `kind`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why (a snake_case name from a closed set).
    pub reason: String,
}

/// One label, `kind`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// What kind (a snake_case name from a closed set).
    pub kind: String,
}

type Histograms = Family<KindLabels, Histogram, fn() -> Histogram>;

/// How guests arrived: the histograms of what each verified guest's report says.
#[derive(Debug)]
struct Arrivals {
    downtime: Histogram,
    iterations: Histogram,
    duration: Histogram,
    throughput: Histogram,
    epochs: Histograms,
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
    arrivals: Arrivals,
    refusals: Family<ReasonLabels, Counter>,
    handshake_failures: Family<KindLabels, Counter>,
    /// Failures before a migration began, as the receiver counts them (rendered from
    /// its counters at each scrape, added to the failures counted here).
    dropped: Family<KindLabels, Gauge>,
}

fn epoch_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 8))
}

impl Arrivals {
    fn new(registry: &mut Registry) -> Self {
        let a = Self {
            // 1 ms to about 33 s.
            downtime: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            iterations: Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0]),
            // 100 ms to about 55 min.
            duration: Histogram::new(exponential_buckets(0.1, 2.0, 16)),
            // 8 MB/s to about 8 GB/s.
            throughput: Histogram::new(exponential_buckets(8e6, 2.0, 11)),
            epochs: Family::new_with_constructor(epoch_buckets),
        };
        let r = registry;
        for (name, help, h) in [
            (
                "migration_downtime_seconds",
                "Downtime as seen here: stop-and-copy start marker to the guest resumed here",
                &a.downtime,
            ),
            (
                "migration_iterations",
                "Pre-copy iterations of each guest verified here, the stop-and-copy pass included",
                &a.iterations,
            ),
            (
                "migration_duration_seconds",
                "Handshake to the end of the switchover, per guest verified here",
                &a.duration,
            ),
            (
                "migration_throughput_bytes_per_second",
                "Payload bytes over the migration's duration, per guest verified here",
                &a.throughput,
            ),
        ] {
            r.register(name, help, h.clone());
        }
        r.register(
            "migration_key_epochs",
            "Key epochs a migration used (1 = never updated), by kind",
            a.epochs.clone(),
        );
        a
    }

    fn observe(&self, report: &ReceiveReport) {
        if let Some(d) = report.downtime {
            self.downtime.observe(d.as_secs_f64());
        }
        if report.iterations == 0 {
            return;
        }
        self.iterations.observe(f64::from(report.iterations));
        let secs = report.elapsed.as_secs_f64();
        self.duration.observe(secs);
        if secs > 0.0 {
            self.throughput.observe(report.bytes as f64 / secs);
        }
        self.epoch("memory", report.epochs);
    }

    fn epoch(&self, kind: &str, epochs: u32) {
        self.epochs
            .get_or_create(&KindLabels { kind: kind.into() })
            .observe(f64::from(epochs));
    }
}

/// `PolicyRequiresEncryption` → `policy_requires_encryption`.
fn snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The reason of a refusal before any page, or `None` if `e` is no refusal.
fn refusal_reason(e: &MigrateError) -> Option<String> {
    use vmotion::AuthorityError as A;
    Some(match e {
        MigrateError::Refused(r) => snake(&format!("{r:?}")),
        MigrateError::PreflightRefused(_) => "preflight".into(),
        MigrateError::AlreadyInFlight(_) => "already_in_flight".into(),
        MigrateError::KeyService(A::VmInFlight { .. }) => "vm_in_flight".into(),
        MigrateError::KeyService(A::DestinationDraining(_)) => "destination_draining".into(),
        _ => return None,
    })
}

/// What kind of failure ended a handshake.
fn handshake_failure(e: &MigrateError) -> String {
    match e {
        MigrateError::Protocol(p) => snake(&format!("{:?}", p.abort_code())),
        MigrateError::PeerAborted { .. } => "peer_aborted".into(),
        MigrateError::Timeout { .. } => "timeout".into(),
        MigrateError::ConnectionClosed { .. } => "closed".into(),
        MigrateError::Io(_) => "io".into(),
        MigrateError::NoKey(_) => "key_unavailable".into(),
        MigrateError::KeyService(_) => "key_service".into(),
        _ => "other".into(),
    }
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
        let (refusals, handshake_failures, dropped) =
            (Family::default(), Family::default(), Family::default());
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
        registry.register(
            "migration_refusals",
            "Migrations refused before any page, by reason",
            refusals.clone(),
        );
        registry.register(
            "handshake_failures",
            "Failures in the handshake, by kind",
            handshake_failures.clone(),
        );
        registry.register(
            "connections_dropped",
            "Connections dropped before any migration began, by kind",
            dropped.clone(),
        );
        Self {
            arrivals: Arrivals::new(&mut registry),
            registry,
            migrations,
            in_flight,
            data_bytes,
            pages,
            tunnel_bytes,
            refusals,
            handshake_failures,
            dropped,
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
                self.arrivals.observe(report);
            }
            Ok(Incoming::Tunnel(report)) => {
                self.count("tunnel", "tunnel_closed", mode_label(report.mode));
                self.arrivals.epoch("tunnel", report.epochs);
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
            Err(e) => self.failed(e, f.handshake_completed),
        }
    }

    fn failed(&self, e: &MigrateError, handshake_completed: bool) {
        let reason = refusal_reason(e);
        self.count(
            "any",
            if reason.is_some() {
                "refused"
            } else {
                "failed"
            },
            "unknown",
        );
        if let Some(reason) = reason {
            self.refusals.get_or_create(&ReasonLabels { reason }).inc();
        } else if !handshake_completed {
            let kind = handshake_failure(e);
            self.handshake_failures
                .get_or_create(&KindLabels { kind })
                .inc();
        }
    }

    /// The metrics as OpenMetrics text, with `in_flight` VMs arriving now and the
    /// receiver's counts of `dropped` connections.
    pub fn render(&self, in_flight: usize, dropped: &[(Dropped, u64)]) -> String {
        self.in_flight
            .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        for (why, n) in dropped {
            let kind = why.name().to_owned();
            self.dropped
                .get_or_create(&KindLabels { kind })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
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
        let text = m.render(2, &[(Dropped::MalformedHello, 3)]);
        for name in [
            "vmotion_migrations_total{kind=\"memory\",result=\"succeeded\",mode=\"encrypted\"} 1",
            "vmotion_migrations_in_flight 2",
            "vmotion_migration_data_processed_bytes_total 0",
            "vmotion_migration_pages_total 0",
            "vmotion_connections_dropped{kind=\"malformed_hello\"} 3",
            "vmotion_migration_downtime_seconds_count 0",
            "# EOF",
        ] {
            assert!(text.contains(name), "{name} in\n{text}");
        }
    }

    #[test]
    fn failures_are_told_apart() {
        let m = RecvMetrics::new();
        let refused = MigrateError::Refused(vmotion_proto::Refusal::PolicyRequiresEncryption);
        m.failed(&refused, false);
        m.failed(&MigrateError::NoKey("gone".into()), false);
        // After the handshake a failure is no handshake failure.
        m.failed(&MigrateError::NoKey("gone".into()), true);
        let text = m.render(0, &[]);
        for (sample, value) in [
            (
                "vmotion_migration_refusals_total{reason=\"policy_requires_encryption\"}",
                "1",
            ),
            (
                "vmotion_handshake_failures_total{kind=\"key_unavailable\"}",
                "1",
            ),
            (
                "vmotion_migrations_total{kind=\"any\",result=\"failed\",mode=\"unknown\"}",
                "2",
            ),
        ] {
            assert!(
                text.contains(&format!("{sample} {value}\n")),
                "{sample} in\n{text}"
            );
        }
    }

    #[test]
    fn snake_case_of_variant_names() {
        assert_eq!(snake("KeyConfirmationFailed"), "key_confirmation_failed");
        assert_eq!(snake("Timeout"), "timeout");
    }
}
