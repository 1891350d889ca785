//! Prometheus metrics: one registry, handles resolved once at startup.
//!
//! The request path never looks a label set up: each listener gets its
//! counters and histograms per outcome at startup ([`RouteMetrics`]), and
//! recording is a few relaxed atomic adds ([`AtomicHistogram`] replaces
//! prometheus-client's mutex-guarded histogram there).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::check::Cause;
use crate::config::{Config, ListenerProtocol};
use crate::state::ServiceState;

/// Labels of per-dependency metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DepLabels {
    /// Dependency name.
    pub dependency: String,
    /// Dependency type.
    pub r#type: String,
}

/// Labels of `check_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// Dependency name.
    pub dependency: String,
    /// Bounded cause label.
    pub cause: String,
}

/// Labels of `dependency_transitions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// Dependency name.
    pub dependency: String,
    /// `up` or `down`.
    pub to: String,
}

/// Labels of `dependency_node_up`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// Dependency name.
    pub dependency: String,
    /// Node address.
    pub node: String,
}

/// Labels of request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Listener name.
    pub listener: String,
    /// Outcome.
    pub outcome: String,
    /// Route name (`default` when no route matched).
    pub route: String,
}

/// Labels of gRPC statuses healthgate answered itself on the data plane.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLocalLabels {
    /// Listener name.
    pub listener: String,
    /// The gRPC status code (a number, 1–16).
    pub grpc_status: String,
}

/// Labels with only the listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// Listener name.
    pub listener: String,
}

/// Labels of TCP connection counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpOutcomeLabels {
    /// Listener name.
    pub listener: String,
    /// `accepted`, `rejected` or `upstream_error`.
    pub outcome: String,
}

/// Labels of TCP byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    /// Listener name.
    pub listener: String,
    /// `in` (client → app) or `out` (app → client).
    pub direction: String,
}

/// Labels of `service_state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// Service state.
    pub state: String,
}

/// Labels of `grpc_health_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// `check`, `watch` or `other`.
    pub method: String,
    /// The gRPC status name in lower case, or `http_error`.
    pub code: String,
}

/// Labels of `overrides_active`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `drain`, `maintenance`, `dependency_up` or `dependency_down`.
    pub kind: String,
}

/// The kinds of operator override, the label values of `overrides_active`.
pub const OVERRIDE_KINDS: [&str; 4] = ["drain", "maintenance", "dependency_up", "dependency_down"];

/// Labels of `build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// Crate version.
    pub version: String,
}

/// The outcome of an HTTP request, a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to the app, which answered.
    Proxied,
    /// Answered by healthgate (503/500 problem+json).
    ShortCircuited,
    /// Forwarded through a bypass path.
    Bypassed,
    /// The app could not be reached or timed out (502/504).
    UpstreamError,
    /// Rejected as malformed or too large (4xx).
    BadRequest,
    /// The client went away before the response head (nginx's 499): the
    /// request may have reached the app and been acted on.
    ClientClosed,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 6] = [
        Outcome::Proxied,
        Outcome::ShortCircuited,
        Outcome::Bypassed,
        Outcome::UpstreamError,
        Outcome::BadRequest,
        Outcome::ClientClosed,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Proxied => "proxied",
            Outcome::ShortCircuited => "short_circuited",
            Outcome::Bypassed => "bypassed",
            Outcome::UpstreamError => "upstream_error",
            Outcome::BadRequest => "bad_request",
            Outcome::ClientClosed => "client_closed",
        }
    }
}

/// Request latency buckets (seconds): 100 µs to 30 s.
const REQUEST_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0];
/// Check latency buckets (seconds): 1 ms to 10 s.
const CHECK_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// TCP connection duration buckets (seconds).
const CONNECTION_BUCKETS: [f64; 10] = [0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 3600.0];

/// A histogram with fixed buckets recorded with atomics only (no lock), for
/// the request path where every worker thread observes concurrently.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<AtomicHistogramInner>);

#[derive(Debug)]
struct AtomicHistogramInner {
    bounds: &'static [f64],
    /// Per-bucket counts (not cumulative); the last slot is +Inf.
    counts: Vec<AtomicU64>,
    /// Sum of observations in nanoseconds (exact, no float CAS loop).
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    /// A histogram with the given upper bounds (seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram(Arc::new(AtomicHistogramInner {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }))
    }

    /// Records a duration.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.0.bounds.iter().position(|b| secs <= *b).unwrap_or(self.0.bounds.len());
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_nanos.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Total observations.
    pub fn count(&self) -> u64 {
        self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type AtomicHistogramFamily<L> = Family<L, AtomicHistogram, fn() -> AtomicHistogram>;

/// Every metric healthgate exports.
pub struct Metrics {
    registry: Registry,
    /// `healthgate_dependency_up`.
    pub dependency_up: Family<DepLabels, Gauge>,
    /// `healthgate_check_duration_seconds`.
    pub check_duration: HistogramFamily<DepLabels>,
    /// `healthgate_check_failures_total`.
    pub check_failures: Family<FailureLabels, Counter>,
    /// `healthgate_dependency_transitions_total`.
    pub transitions: Family<TransitionLabels, Counter>,
    /// `healthgate_dependency_node_up`.
    pub node_up: Family<NodeLabels, Gauge>,
    /// `healthgate_service_state`.
    pub service_state: Family<StateLabels, Gauge>,
    /// `healthgate_requests_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `healthgate_request_duration_seconds`.
    pub request_duration: AtomicHistogramFamily<RequestLabels>,
    /// `healthgate_active_connections`.
    pub active_connections: Family<ListenerLabels, Gauge>,
    /// `healthgate_parked_connections`.
    pub parked_connections: Family<ListenerLabels, Gauge>,
    /// `healthgate_tcp_connections_total`.
    pub tcp_connections: Family<TcpOutcomeLabels, Counter>,
    /// `healthgate_tcp_bytes_total`.
    pub tcp_bytes: Family<TcpBytesLabels, Counter>,
    /// `healthgate_tcp_connection_duration_seconds`.
    pub tcp_connection_duration: AtomicHistogramFamily<ListenerLabels>,
    /// `healthgate_tcp_paused`: 1 while a TCP listener refuses new connections.
    pub tcp_paused: Family<ListenerLabels, Gauge>,
    /// `healthgate_tcp_outage_closes_total`: established connections cut by `on_outage: close_existing`.
    pub tcp_outage_closes: Family<ListenerLabels, Counter>,
    /// `healthgate_tcp_held_connections`: refused connections held for `reject_delay`.
    pub tcp_held_connections: Family<ListenerLabels, Gauge>,
    /// `healthgate_overrides_active`.
    pub overrides_active: Family<KindLabels, Gauge>,
    /// `healthgate_control_auth_failures_total`.
    pub control_auth_failures: Counter,
    /// `healthgate_admin_connections_shed_total`.
    pub admin_connections_shed: Counter,
    /// The `healthgate_config_*` metrics of reloads.
    pub reload: ReloadMetrics,
    /// The fleet and slow-start metrics.
    pub fleet: FleetMetrics,
    /// `healthgate_grpc_local_responses_total`.
    pub grpc_local_responses: Family<GrpcLocalLabels, Counter>,
    /// `healthgate_grpc_health_requests_total`.
    pub grpc_health_requests: Family<GrpcLabels, Counter>,
}

/// Labels of `healthgate_config_reloads_total`: `success` or `failure`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` | `failure`.
    pub result: String,
}

/// The metrics of config reloads (docs/reload.md).
pub struct ReloadMetrics {
    /// `healthgate_config_reloads_total{result}`.
    pub reloads: Family<ResultLabels, Counter>,
    /// `healthgate_config_last_reload_success_timestamp_seconds` (0 before the first reload).
    pub last_success: Gauge<f64, AtomicU64>,
    /// `healthgate_config_last_reload_successful`: 1 when the last attempt succeeded (or none was made).
    pub last_successful: Gauge,
    /// `healthgate_config_hash`: the hash of the config in force, as a number.
    pub hash: Gauge,
}

impl ReloadMetrics {
    fn register(registry: &mut Registry, config: &Config) -> ReloadMetrics {
        let m = ReloadMetrics {
            reloads: Family::default(),
            last_success: Gauge::default(),
            last_successful: Gauge::default(),
            hash: Gauge::default(),
        };
        registry.register("config_reloads", "Config reloads by result (success, failure)", m.reloads.clone());
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config reload (0: none since the start)",
            m.last_success.clone(),
        );
        registry.register(
            "config_last_reload_successful",
            "1 when the last config reload succeeded or none was attempted, 0 after a failed one",
            m.last_successful.clone(),
        );
        registry.register("config_hash", "Hash of the config file in force (as in /status)", m.hash.clone());
        for result in ["success", "failure"] {
            let _ = m.reloads.get_or_create(&ResultLabels { result: result.into() });
        }
        m.last_successful.set(1);
        m.hash.set(config.hash as i64);
        m
    }
}

impl Metrics {
    /// Registers every metric and pre-creates the series of the configured
    /// dependencies and listeners, so dashboards see zeros rather than gaps.
    pub fn new(config: &Config) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("healthgate");
        let dependency_up = Family::<DepLabels, Gauge>::default();
        let check_duration: HistogramFamily<DepLabels> = Family::new_with_constructor(|| Histogram::new(CHECK_BUCKETS));
        let check_failures = Family::<FailureLabels, Counter>::default();
        let transitions = Family::<TransitionLabels, Counter>::default();
        let node_up = Family::<NodeLabels, Gauge>::default();
        let service_state = Family::<StateLabels, Gauge>::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration: AtomicHistogramFamily<RequestLabels> =
            Family::new_with_constructor(|| AtomicHistogram::new(&REQUEST_BUCKETS));
        let active_connections = Family::<ListenerLabels, Gauge>::default();
        let parked_connections = Family::<ListenerLabels, Gauge>::default();
        let tcp_connections = Family::<TcpOutcomeLabels, Counter>::default();
        let tcp_bytes = Family::<TcpBytesLabels, Counter>::default();
        let tcp_connection_duration: AtomicHistogramFamily<ListenerLabels> =
            Family::new_with_constructor(|| AtomicHistogram::new(&CONNECTION_BUCKETS));
        let tcp_paused = Family::<ListenerLabels, Gauge>::default();
        let tcp_outage_closes = Family::<ListenerLabels, Counter>::default();
        let tcp_held_connections = Family::<ListenerLabels, Gauge>::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        let overrides_active = Family::<KindLabels, Gauge>::default();
        let control_auth_failures = Counter::default();
        let admin_connections_shed = Counter::default();
        let reload = ReloadMetrics::register(&mut registry, config);
        let fleet = FleetMetrics::register(&mut registry, config);
        let grpc_local_responses = Family::<GrpcLocalLabels, Counter>::default();
        let grpc_health_requests = Family::<GrpcLabels, Counter>::default();

        registry.register(
            "dependency_up",
            "1 when the dependency is up, 0 when down or not yet checked",
            dependency_up.clone(),
        );
        registry.register("check_duration_seconds", "Duration of dependency checks", check_duration.clone());
        registry.register("check_failures", "Failed dependency checks by cause", check_failures.clone());
        registry.register("dependency_transitions", "Dependency state transitions", transitions.clone());
        registry.register("dependency_node_up", "1 when a node of a clustered dependency is up", node_up.clone());
        registry.register("service_state", "1 for the current service state", service_state.clone());
        registry.register("requests", "Inbound HTTP requests by outcome", requests.clone());
        registry.register(
            "request_duration_seconds",
            "Inbound HTTP request duration by outcome",
            request_duration.clone(),
        );
        registry.register("active_connections", "Open client connections", active_connections.clone());
        registry.register(
            "parked_connections",
            "Idle HTTP keep-alive client connections parked (hyper's per-connection state released)",
            parked_connections.clone(),
        );
        registry.register("tcp_connections", "TCP listener connections by outcome", tcp_connections.clone());
        registry.register("tcp_bytes", "Bytes relayed by TCP listeners", tcp_bytes.clone());
        registry.register(
            "tcp_connection_duration_seconds",
            "TCP listener connection duration",
            tcp_connection_duration.clone(),
        );
        registry.register(
            "tcp_paused",
            "1 while a TCP listener refuses new connections because of its needed dependencies",
            tcp_paused.clone(),
        );
        registry.register(
            "tcp_outage_closes",
            "Established TCP connections closed because the listener's needed dependencies went down",
            tcp_outage_closes.clone(),
        );
        registry.register(
            "tcp_held_connections",
            "Refused TCP connections held for reject_delay before they are closed",
            tcp_held_connections.clone(),
        );
        registry.register("build_info", "Build information", build_info.clone());
        registry.register("overrides_active", "Active operator overrides by kind", overrides_active.clone());
        registry.register(
            "control_auth_failures",
            "Control API requests refused for a missing or wrong token",
            control_auth_failures.clone(),
        );
        registry.register(
            "admin_connections_shed",
            "Admin connections closed to make room at admin.max_connections",
            admin_connections_shed.clone(),
        );
        registry.register(
            "grpc_local_responses",
            "gRPC calls healthgate answered itself (short-circuits, upstream failures) by gRPC status",
            grpc_local_responses.clone(),
        );
        registry.register(
            "grpc_health_requests",
            "gRPC health calls on the admin port by method and status",
            grpc_health_requests.clone(),
        );
        // The probes' methods, at zero from the start (for rate() in dashboards).
        for method in ["check", "watch"] {
            let _ = grpc_health_requests.get_or_create(&GrpcLabels { method: method.into(), code: "ok".into() });
        }
        for kind in OVERRIDE_KINDS {
            overrides_active.get_or_create(&KindLabels { kind: kind.into() }).set(0);
        }

        build_info.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        for d in &config.dependencies {
            let labels = DepLabels { dependency: d.name.clone(), r#type: d.kind.type_name().into() };
            dependency_up.get_or_create(&labels).set(0);
            let _ = check_duration.get_or_create(&labels);
            for to in ["up", "down"] {
                let _ = transitions.get_or_create(&TransitionLabels { dependency: d.name.clone(), to: to.into() });
            }
        }
        for s in ServiceState::ALL {
            service_state.get_or_create(&StateLabels { state: s.as_str().into() }).set(0);
        }
        for l in &config.listeners {
            let _ = active_connections.get_or_create(&ListenerLabels { listener: l.name.clone() });
            if l.protocol == ListenerProtocol::Http {
                let _ = parked_connections.get_or_create(&ListenerLabels { listener: l.name.clone() });
                // UNAVAILABLE, the default short-circuit status, so dashboards see a zero.
                let _ = grpc_local_responses
                    .get_or_create(&GrpcLocalLabels { listener: l.name.clone(), grpc_status: "14".into() });
            }
            if l.protocol == ListenerProtocol::Tcp {
                let labels = ListenerLabels { listener: l.name.clone() };
                let _ = tcp_paused.get_or_create(&labels);
                let _ = tcp_outage_closes.get_or_create(&labels);
                let _ = tcp_held_connections.get_or_create(&labels);
                for outcome in ["accepted", "rejected", "upstream_error"] {
                    let _ = tcp_connections
                        .get_or_create(&TcpOutcomeLabels { listener: l.name.clone(), outcome: outcome.into() });
                }
            }
        }

        Arc::new(Metrics {
            registry,
            dependency_up,
            check_duration,
            check_failures,
            transitions,
            node_up,
            service_state,
            requests,
            request_duration,
            active_connections,
            parked_connections,
            tcp_connections,
            tcp_bytes,
            tcp_connection_duration,
            tcp_paused,
            tcp_outage_closes,
            tcp_held_connections,
            overrides_active,
            control_auth_failures,
            admin_connections_shed,
            reload,
            fleet,
            grpc_local_responses,
            grpc_health_requests,
        })
    }

    /// Records a failed check.
    pub fn check_failed(&self, dependency: &str, cause: Cause) {
        self.check_failures
            .get_or_create(&FailureLabels { dependency: dependency.into(), cause: cause.as_str().into() })
            .inc();
    }

    /// Sets the `service_state` gauge to 1 for `state`, 0 for the others.
    pub fn set_service_state(&self, state: ServiceState) {
        for s in ServiceState::ALL {
            self.service_state.get_or_create(&StateLabels { state: s.as_str().into() }).set((s == state) as i64);
        }
    }

    /// Request handles of one HTTP listener and route, resolved once (this
    /// creates the route's series: TCP listeners, which have no requests,
    /// never call it).
    pub fn route(&self, listener: &str, route: &str) -> RouteMetrics {
        let get = |o: Outcome| {
            let labels = RequestLabels { listener: listener.into(), outcome: o.as_str().into(), route: route.into() };
            (self.requests.get_or_create_owned(&labels), self.request_duration.get_or_create_owned(&labels))
        };
        RouteMetrics { by_outcome: Outcome::ALL.map(get) }
    }

    /// The open-connections gauge of a listener.
    pub fn active_connections(&self, listener: &str) -> Gauge {
        self.active_connections.get_or_create_owned(&ListenerLabels { listener: listener.into() })
    }

    /// Counts a gRPC status healthgate answered itself on `listener`.
    pub fn grpc_local_response(&self, listener: &str, grpc_status: &'static str) {
        self.grpc_local_responses
            .get_or_create(&GrpcLocalLabels { listener: listener.into(), grpc_status: grpc_status.into() })
            .inc();
    }

    /// The parked-connections gauge of an HTTP listener.
    pub fn parked_connections(&self, listener: &str) -> Gauge {
        self.parked_connections.get_or_create_owned(&ListenerLabels { listener: listener.into() })
    }

    /// Renders the metrics in the Prometheus text format 0.0.4 (what
    /// `promtool check metrics` and every Prometheus version read).
    pub fn render_prometheus(&self) -> String {
        to_prometheus_text(&self.render_openmetrics())
    }

    /// Renders the metrics in the OpenMetrics text format.
    pub fn render_openmetrics(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Labels with only the dependency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    /// Dependency name.
    pub dependency: String,
}

/// Labels of `fleet_verdict`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    /// Dependency name.
    pub dependency: String,
    /// `healthy`, `alone`, `settling`, `local_failure` or `shared_outage`.
    pub verdict: String,
}

/// Labels of `fleet_peers`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerCountLabels {
    /// `known` (resolved, itself excluded) or `fresh` (a view within `freshness`).
    pub state: String,
}

/// Labels of `fleet_peer_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerOutcomeLabels {
    /// `ok`, `timeout`, `refused`, `bad_view` or `error`.
    pub outcome: String,
}

/// The fleet's metrics (registered only with a `fleet` section) and the
/// slow-start gauge (only for dependencies with `slow_start`).
pub struct FleetMetrics {
    /// `healthgate_fleet_peers`.
    pub peers: Family<PeerCountLabels, Gauge>,
    /// `healthgate_fleet_peers_up_ratio`: share of fresh peer views seeing a dependency up.
    pub peers_up_ratio: Family<DependencyLabels, Gauge<f64, AtomicU64>>,
    /// `healthgate_fleet_verdict`: 1 for the current verdict of each dependency.
    pub verdict: Family<VerdictLabels, Gauge>,
    /// `healthgate_fleet_peer_requests_total`.
    pub peer_requests: Family<PeerOutcomeLabels, Counter>,
    /// `healthgate_slow_start_admitted_ratio`.
    pub admitted_ratio: Family<DependencyLabels, Gauge<f64, AtomicU64>>,
}

impl FleetMetrics {
    fn register(registry: &mut Registry, config: &Config) -> FleetMetrics {
        let m = FleetMetrics {
            peers: Family::default(),
            peers_up_ratio: Family::default(),
            verdict: Family::default(),
            peer_requests: Family::default(),
            admitted_ratio: Family::default(),
        };
        if config.fleet.is_some() {
            registry.register("fleet_peers", "Peers known (itself excluded) and with a fresh view", m.peers.clone());
            registry.register(
                "fleet_peers_up_ratio",
                "Share of the fresh peer views (with a verdict) that see the dependency up",
                m.peers_up_ratio.clone(),
            );
            registry.register(
                "fleet_verdict",
                "1 for the fleet verdict this pod applies to the dependency",
                m.verdict.clone(),
            );
            registry.register("fleet_peer_requests", "Peer view requests by outcome", m.peer_requests.clone());
            for state in ["known", "fresh"] {
                m.peers.get_or_create(&PeerCountLabels { state: state.into() }).set(0);
            }
            for outcome in ["ok", "timeout", "refused", "bad_view", "error"] {
                let _ = m.peer_requests.get_or_create(&PeerOutcomeLabels { outcome: outcome.into() });
            }
        }
        if config.dependencies.iter().any(|d| d.slow_start.is_some()) {
            registry.register(
                "slow_start_admitted_ratio",
                "Share of the requests needing the dependency that are admitted (ramps after a recovery)",
                m.admitted_ratio.clone(),
            );
            for d in config.dependencies.iter().filter(|d| d.slow_start.is_some()) {
                m.admitted_ratio.get_or_create(&DependencyLabels { dependency: d.name.clone() }).set(0.0);
            }
        }
        m
    }
}

/// Request metrics of one listener and route, indexed by [`Outcome`].
#[derive(Clone)]
pub struct RouteMetrics {
    by_outcome: [(Counter, AtomicHistogram); Outcome::ALL.len()],
}

impl RouteMetrics {
    /// Handles registered nowhere: what records them is never exported. For
    /// listeners without HTTP requests (TCP), whose routes must not add
    /// always-zero request series to the exposition.
    pub fn unregistered() -> RouteMetrics {
        RouteMetrics { by_outcome: Outcome::ALL.map(|_| (Counter::default(), AtomicHistogram::new(&REQUEST_BUCKETS))) }
    }

    /// Records one finished request.
    #[inline]
    pub fn record(&self, outcome: Outcome, elapsed: Duration) {
        let (count, duration) = &self.by_outcome[outcome as usize];
        count.inc();
        duration.observe(elapsed);
    }
}

/// Converts OpenMetrics text to Prometheus text 0.0.4: counters' `TYPE` and
/// `HELP` lines name the `_total` series, and `# EOF`/`# UNIT` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_string());
        }
    }
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# TYPE ", "# HELP "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn metrics() -> Arc<Metrics> {
        let yaml = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\ndependencies:\n  - name: db\n    type: tcp\n    address: x:1\n";
        Metrics::new(&Config::from_yaml(yaml, Path::new("t")).unwrap())
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = metrics();
        m.route("web", "default").record(Outcome::Proxied, Duration::from_millis(3));
        m.check_failed("db", Cause::Refused);
        let text = m.render_prometheus();
        for needle in [
            "# TYPE healthgate_requests_total counter",
            "healthgate_requests_total{listener=\"web\",outcome=\"proxied\",route=\"default\"} 1",
            "healthgate_request_duration_seconds_bucket{le=\"0.005\",listener=\"web\",outcome=\"proxied\",route=\"default\"} 1",
            "healthgate_check_failures_total{dependency=\"db\",cause=\"refused\"} 1",
            "healthgate_dependency_up{dependency=\"db\",type=\"tcp\"} 0",
            "healthgate_build_info{version=",
            "healthgate_service_state{state=\"starting\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn atomic_histogram_buckets_are_cumulative_when_rendered() {
        let h = AtomicHistogram::new(&REQUEST_BUCKETS);
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(2));
        h.observe(Duration::from_secs(100));
        assert_eq!(h.count(), 3);
        let mut reg = Registry::default();
        reg.register("x_seconds", "x", h);
        let text = {
            let mut s = String::new();
            prometheus_client::encoding::text::encode(&mut s, &reg).unwrap();
            s
        };
        assert!(text.contains("x_seconds_bucket{le=\"0.0001\"} 1"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"0.0025\"} 2"), "{text}");
        assert!(text.contains("x_seconds_count 3"), "{text}");
    }

    #[test]
    fn atomic_histogram_ends_with_an_inf_bucket_holding_every_observation() {
        let h = AtomicHistogram::new(&CONNECTION_BUCKETS);
        h.observe(Duration::from_secs(7200));
        h.observe(Duration::from_millis(1));
        let mut reg = Registry::default();
        reg.register("y_seconds", "y", h);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(text.contains("y_seconds_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(!text.contains("e308"), "a finite stand-in for +Inf breaks histogram_quantile: {text}");
    }
}
