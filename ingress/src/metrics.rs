//! Per-endpoint metrics, served at the ingress's `/metrics` in the
//! Prometheus text format (SPEC §5 Ingress, issue 6 "Visibility"):
//!
//! - `verge_ingress_active_connections{endpoint}`: open now;
//! - `verge_ingress_connections_total{endpoint}`: accepted and admitted;
//! - `verge_ingress_rejected_total{endpoint,reason}`: closed on accept
//!   (`max_connections`, `rate_limit`, `no_backend`);
//! - `verge_ingress_bytes_total{endpoint,direction}`: `to_backend`,
//!   `to_client`, counted as bytes move;
//! - `verge_ingress_connect_errors_total{endpoint}`: failed backend connects;
//! - `verge_ingress_backend_connect_seconds{endpoint}`: how long backend
//!   connects took (histogram).
//!
//! `endpoint` is `org/app/env/name`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::proxy::Meter;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rejected {
    endpoint: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Bytes {
    endpoint: String,
    direction: &'static str,
}

/// Every metric family of one ingress.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    active: Family<EndpointLabel, Gauge>,
    total: Family<EndpointLabel, Counter>,
    rejected: Family<Rejected, Counter>,
    bytes: Family<Bytes, Counter>,
    connect_errors: Family<EndpointLabel, Counter>,
    connect_seconds: Family<EndpointLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("verge_ingress");
        let active = Family::<EndpointLabel, Gauge>::default();
        let total = Family::<EndpointLabel, Counter>::default();
        let rejected = Family::<Rejected, Counter>::default();
        let bytes = Family::<Bytes, Counter>::default();
        let connect_errors = Family::<EndpointLabel, Counter>::default();
        // 50 µs to about 3 s.
        let connect_seconds = Family::<EndpointLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 3.0, 11))
        });
        registry.register("active_connections", "Connections open now", active.clone());
        registry.register(
            "connections",
            "Connections accepted and admitted",
            total.clone(),
        );
        registry.register(
            "rejected",
            "Connections closed on accept: max_connections, rate_limit or no_backend",
            rejected.clone(),
        );
        registry.register(
            "bytes",
            "Bytes relayed, by direction (to_backend, to_client)",
            bytes.clone(),
        );
        registry.register(
            "connect_errors",
            "Backend connects that failed (each retry counts)",
            connect_errors.clone(),
        );
        registry.register(
            "backend_connect_seconds",
            "How long successful backend connects took",
            connect_seconds.clone(),
        );
        Metrics {
            registry,
            active,
            total,
            rejected,
            bytes,
            connect_errors,
            connect_seconds,
        }
    }
}

impl Metrics {
    /// The handles of one endpoint, resolved once per endpoint (not per
    /// connection).
    pub fn endpoint(&self, name: &str) -> Arc<EndpointMetrics> {
        let label = EndpointLabel {
            endpoint: name.to_string(),
        };
        let bytes = |direction| Bytes {
            endpoint: name.to_string(),
            direction,
        };
        let rejected = |reason| Rejected {
            endpoint: name.to_string(),
            reason,
        };
        // One statement each: `get_or_create` returns a read guard on the
        // family, and a second call on the same family in the same
        // statement would wait for it forever.
        let active = self.active.get_or_create(&label).clone();
        let total = self.total.get_or_create(&label).clone();
        let rejected_max = self
            .rejected
            .get_or_create(&rejected("max_connections"))
            .clone();
        let rejected_rate = self.rejected.get_or_create(&rejected("rate_limit")).clone();
        let rejected_backend = self.rejected.get_or_create(&rejected("no_backend")).clone();
        let to_backend = self.bytes.get_or_create(&bytes("to_backend")).clone();
        let to_client = self.bytes.get_or_create(&bytes("to_client")).clone();
        let connect_errors = self.connect_errors.get_or_create(&label).clone();
        let connect_seconds = self.connect_seconds.get_or_create(&label).clone();
        Arc::new(EndpointMetrics {
            active,
            total,
            rejected_max,
            rejected_rate,
            rejected_backend,
            meter: Meter {
                to_backend,
                to_client,
            },
            connect_errors,
            connect_seconds,
        })
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// One endpoint's metric handles.
#[derive(Debug)]
pub struct EndpointMetrics {
    pub active: Gauge,
    pub total: Counter,
    pub rejected_max: Counter,
    pub rejected_rate: Counter,
    pub rejected_backend: Counter,
    pub meter: Meter,
    pub connect_errors: Counter,
    pub connect_seconds: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_gets_every_family_and_shows_in_the_text() {
        let m = Metrics::default();
        let e = m.endpoint("o/a/e/public");
        e.total.inc();
        e.meter.to_client.inc_by(5);
        e.connect_seconds.observe(0.001);
        let again = m.endpoint("o/a/e/public");
        assert_eq!(
            again.total.get(),
            1,
            "the same handles for the same endpoint"
        );
        let text = m.encode();
        for want in [
            "verge_ingress_connections_total{endpoint=\"o/a/e/public\"} 1",
            "verge_ingress_bytes_total{endpoint=\"o/a/e/public\",direction=\"to_client\"} 5",
            "verge_ingress_rejected_total{endpoint=\"o/a/e/public\",reason=\"rate_limit\"} 0",
            "verge_ingress_backend_connect_seconds_count{endpoint=\"o/a/e/public\"} 1",
            "verge_ingress_active_connections{endpoint=\"o/a/e/public\"} 0",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
    }
}
