//! Prometheus metrics of the key service (`metrics_listen`), served by
//! [`vmotion_metrics::serve`]:
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `vmotion_keyservice_requests_total` | counter | `action` (as in the audit log: `create_migration`, `fetch_key`, `record_outcome`, …), `result` (`ok` or the error code) | requests answered by this replica |
//! | `vmotion_keyservice_request_duration_seconds` | histogram | `action` | time to answer, the store's time included (an etcd round trip, a journal fsync) |
//! | `vmotion_keyservice_store_duration_seconds` | histogram | `op` (`create`, `fetch_key`, `record_outcome`, `outcome`, `register`, `host`, `set_draining`, `is_draining`) | the store's part alone: etcd transactions, or the journal's append and fsync |

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    action: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

type Durations = Family<ActionLabels, Histogram, fn() -> Histogram>;
type StoreDurations = Family<OpLabels, Histogram, fn() -> Histogram>;

/// What the key service counts.
#[derive(Debug)]
pub(crate) struct KsMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Durations,
    store: StoreDurations,
}

/// 100 µs to about 6.5 s, doubling.
fn buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl KsMetrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("vmotion_keyservice");
        let requests = Family::default();
        let durations: Durations = Family::new_with_constructor(buckets);
        let store: StoreDurations = Family::new_with_constructor(buckets);
        registry.register(
            "requests",
            "Requests answered, by action and result",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a request, the store's included, by action",
            durations.clone(),
        );
        registry.register(
            "store_duration_seconds",
            "Time the store took for one operation (etcd transactions, journal append and fsync), by operation",
            store.clone(),
        );
        Self {
            registry,
            requests,
            durations,
            store,
        }
    }

    /// Counts one answered request.
    pub(crate) fn request(&self, action: &str, result: &str, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                action: action.into(),
                result: result.into(),
            })
            .inc();
        self.durations
            .get_or_create(&ActionLabels {
                action: action.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// Observes one store operation's time.
    pub(crate) fn store(&self, op: &str, took: Duration) {
        self.store
            .get_or_create(&OpLabels { op: op.into() })
            .observe(took.as_secs_f64());
    }

    /// The metrics as OpenMetrics text.
    pub(crate) fn render(&self) -> String {
        vmotion_metrics::render(&self.registry)
    }
}
