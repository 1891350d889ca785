//! The data plane: HTTP and TCP listeners gated by the shared health state.
//!
//! Each worker thread runs its own current-thread runtime and its own
//! `SO_REUSEPORT` socket per listener (see `crate::server`), and calls
//! [`http::serve`] or [`tcp::serve`] with a shared [`ListenerCtx`]. Both run
//! the same accept loop ([`accept`]: connection permits, holding a
//! connection at `max_connections`, drain) and only say how to serve an
//! accepted connection. Anything per-connection or per-worker (the upstream
//! connection pool) lives inside `serve`, so workers share nothing mutable
//! but atomics.

pub mod accept;
pub mod http;
pub mod tcp;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::header::HeaderValue;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Config, ListenerConfig, ListenerProtocol, ShortCircuitConfig};
use crate::metrics::{Metrics, RouteMetrics};
use crate::routes::{RouteConfig, RouteTable};
use crate::state::{Admission, Classes, Health, Reject, gate_mask_of};

/// The drain signal: `None` while running; `Some(deadline)` once the listener
/// must stop accepting and finish in-flight work by `deadline`.
pub type DrainSignal = watch::Receiver<Option<Instant>>;

/// A listener's context as one worker sees it: a reload stores a new one,
/// and each request (or TCP admission) loads the one in force once, so it
/// runs under the old config or the new one, never a mix. One per worker and
/// listener, so that loading it touches no cache line another worker writes.
pub type LiveCtx = Arc<ArcSwap<ListenerCtx>>;

/// A [`LiveCtx`] holding `ctx` until a reload replaces it.
pub fn live(ctx: Arc<ListenerCtx>) -> LiveCtx {
    Arc::new(ArcSwap::new(ctx))
}

/// Everything a listener's workers share (read-only but for atomics).
pub struct ListenerCtx {
    /// The listener's config.
    pub config: ListenerConfig,
    /// Shared health state.
    pub health: Arc<Health>,
    /// Open client connections.
    pub active_connections: Gauge,
    /// The registry, for per-route or per-protocol handles.
    pub registry: Arc<Metrics>,
    /// The compiled route table (bypass prefixes included).
    pub routes: RouteTable,
    /// Per-route admission data, indexed like `routes.routes()`.
    pub route_data: Vec<Route>,
    /// What a request matching no route gets.
    pub default_route: Route,
    /// The impact classes of the dependencies of this context's config.
    pub classes: Classes,
    /// `drain.delay`: during a drain, how long an idle HTTP client
    /// connection is left for its client's next request before it is closed.
    pub drain_delay: Duration,
}

/// Admission data of one route, resolved at startup.
pub struct Route {
    /// Route name (`default` when none matched).
    pub name: String,
    /// Dependencies the route needs (bit mask).
    pub needs: u64,
    /// Its short-circuit responses.
    pub responses: Responses,
    /// Its request metrics.
    pub metrics: RouteMetrics,
    /// A `bypass` prefix: always forwarded, outcome `bypassed`.
    pub bypass: bool,
}

impl ListenerCtx {
    /// Builds the context of listener `index` of `config`.
    pub fn new(config: &Config, index: usize, health: Arc<Health>, registry: Arc<Metrics>) -> Arc<ListenerCtx> {
        let bits: Vec<usize> = (0..config.dependencies.len()).collect();
        Self::with_bits(config, index, health, registry, &bits)
    }

    /// Builds the context of listener `index` of `config`, `bits[i]` being
    /// the mask bit of dependency `i` ([`crate::state::DepSlot::bit`]).
    pub fn with_bits(
        config: &Config,
        index: usize,
        health: Arc<Health>,
        registry: Arc<Metrics>,
        bits: &[usize],
    ) -> Arc<ListenerCtx> {
        let l = &config.listeners[index];
        let base = Responses::new(&config.short_circuit);
        // Only HTTP listeners have requests: a TCP listener exports no
        // request series (they would stay 0 for every outcome).
        let metrics = |route: &str| match l.protocol {
            ListenerProtocol::Http => registry.route(&l.name, route),
            ListenerProtocol::Tcp => RouteMetrics::unregistered(),
        };
        let default_route = Route {
            name: "default".into(),
            needs: gate_mask_of(bits, &l.needs),
            responses: base.clone(),
            metrics: metrics("default"),
            bypass: false,
        };
        let route_data = l
            .routes
            .iter()
            .map(|r| Route {
                name: r.name.clone(),
                needs: gate_mask_of(bits, &r.needs),
                responses: base.with_overrides(r),
                metrics: metrics(&r.name),
                bypass: r.bypass,
            })
            .collect();
        Arc::new(ListenerCtx {
            config: l.clone(),
            active_connections: registry.active_connections(&l.name),
            routes: RouteTable::new(l.routes.clone()),
            route_data,
            default_route,
            classes: Classes::of(config, bits),
            drain_delay: config.drain.delay,
            health,
            registry,
        })
    }

    /// The admission of a request or connection needing `needs` under this
    /// context's config (its impact classes, the verdicts in force).
    #[inline]
    pub fn admission(&self, needs: u64) -> Admission {
        self.health.admission_in(needs, self.classes)
    }

    /// [`Health::gate`](crate::state::Health::gate) under this config's impact classes.
    pub fn gate(&self, needs: u64) -> Admission {
        self.health.gate_in(needs, self.classes)
    }

    /// The route a request takes: first match wins, else the default. Allocation-free.
    #[inline]
    pub fn route(&self, method: &hyper::Method, path: &str, headers: &hyper::HeaderMap) -> &Route {
        match self.routes.select(method, path, headers) {
            Some(i) => &self.route_data[i],
            None => &self.default_route,
        }
    }
}

/// Short-circuit responses, rendered once at startup.
#[derive(Debug, Clone)]
pub struct Responses {
    /// Body of the 503.
    pub out_of_service: Bytes,
    /// Body of the 500.
    pub degraded: Bytes,
    /// Body of the 503 during maintenance.
    pub maintenance: Bytes,
    /// `Retry-After` value (seconds) for the 503.
    pub retry_after: Bytes,
    /// Base `Retry-After` in seconds.
    retry_after_secs: u64,
    /// Up to this many seconds are added to each 503's `Retry-After`.
    retry_after_spread: u64,
    /// Whether to name missing dependencies in the body.
    pub expose_dependencies: bool,
    /// `short_circuit.retry_after`, for a gRPC answer's `RetryInfo`.
    pub retry_delay: Duration,
    /// gRPC status of a gRPC call short-circuited out of service or in maintenance.
    pub grpc_out_of_service: u8,
    /// gRPC status of a gRPC call short-circuited while degraded.
    pub grpc_degraded: u8,
}

/// The media type of short-circuit bodies (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

impl Responses {
    /// Renders the configured bodies.
    pub fn new(c: &ShortCircuitConfig) -> Responses {
        Responses {
            out_of_service: Bytes::from(c.out_of_service_body.clone()),
            degraded: Bytes::from(c.degraded_body.clone()),
            maintenance: Bytes::from(c.maintenance_body.clone()),
            retry_after: Bytes::from(c.retry_after.as_secs().max(1).to_string()),
            retry_after_secs: c.retry_after.as_secs().max(1),
            retry_after_spread: c.retry_after_spread.as_secs(),
            expose_dependencies: c.expose_dependencies,
            retry_delay: c.retry_after.max(Duration::from_secs(1)),
            grpc_out_of_service: c.grpc_out_of_service_status,
            grpc_degraded: c.grpc_degraded_status,
        }
    }

    /// These responses with a route's overrides applied.
    pub fn with_overrides(&self, r: &RouteConfig) -> Responses {
        Responses {
            out_of_service: r
                .out_of_service_body
                .clone()
                .map(Bytes::from)
                .unwrap_or_else(|| self.out_of_service.clone()),
            degraded: r.degraded_body.clone().map(Bytes::from).unwrap_or_else(|| self.degraded.clone()),
            maintenance: self.maintenance.clone(),
            retry_after: self.retry_after.clone(),
            retry_after_secs: self.retry_after_secs,
            retry_after_spread: self.retry_after_spread,
            expose_dependencies: r.expose_dependencies.unwrap_or(self.expose_dependencies),
            ..self.clone()
        }
    }

    /// The `Retry-After` of one 503: the configured value plus a random
    /// whole number of seconds up to `retry_after_spread`, so the clients
    /// turned away together do not all come back in the same second.
    pub fn retry_after_value(&self) -> HeaderValue {
        if self.retry_after_spread == 0 {
            return HeaderValue::from(self.retry_after_secs);
        }
        HeaderValue::from(self.retry_after_secs + rand::random_range(0..=self.retry_after_spread))
    }

    /// Status and body for a rejection; `missing` names the dependencies that
    /// are not up (used only when the operator opted in).
    pub fn body(&self, reject: Reject, missing: u64, health: &Health) -> (u16, Bytes) {
        let (status, base) = match reject {
            Reject::OutOfService => (503, &self.out_of_service),
            Reject::Degraded => (500, &self.degraded),
            // The pod is out by an operator's decision: no dependency to name.
            Reject::Maintenance => return (503, self.maintenance.clone()),
        };
        if !self.expose_dependencies {
            return (status, base.clone());
        }
        // Opt-in detail: add `"dependencies":[...]` to the configured object.
        let mut obj: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(base).unwrap_or_default();
        obj.insert("dependencies".into(), health.names(missing).into_iter().map(serde_json::Value::String).collect());
        (status, Bytes::from(serde_json::to_vec(&obj).unwrap_or_else(|_| base.to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_OUT_OF_SERVICE_BODY;
    use std::path::Path;

    #[test]
    fn retry_after_is_spread_over_the_configured_seconds() {
        let yaml = "short_circuit:\n  retry_after: 5s\n  retry_after_spread: 4s\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n";
        let c = Config::from_yaml(yaml, Path::new("t")).unwrap();
        let r = Responses::new(&c.short_circuit);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            seen.insert(r.retry_after_value().to_str().unwrap().parse::<u64>().unwrap());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![5, 6, 7, 8, 9]);
        let plain = Responses::new(
            &Config::from_yaml(&yaml.replace("  retry_after_spread: 4s\n", ""), Path::new("t")).unwrap().short_circuit,
        );
        assert!((0..100).all(|_| plain.retry_after_value() == "5"));
    }

    #[test]
    fn opt_in_body_names_the_missing_dependencies_only_when_asked() {
        let yaml = "short_circuit:\n  expose_dependencies: true\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\ndependencies:\n  - name: db\n    type: tcp\n    address: x:1\n";
        let c = Config::from_yaml(yaml, Path::new("t")).unwrap();
        let h = Health::new(&c);
        let r = Responses::new(&c.short_circuit);
        let (status, body) = r.body(Reject::OutOfService, 1, &h);
        assert_eq!(status, 503);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["cause"], "OUT OF SERVICE");
        assert_eq!(v["dependencies"], serde_json::json!(["db"]));
        let plain = Responses { expose_dependencies: false, ..r };
        assert_eq!(
            plain.body(Reject::OutOfService, 1, &h).1,
            Bytes::from_static(DEFAULT_OUT_OF_SERVICE_BODY.as_bytes())
        );
    }
}
