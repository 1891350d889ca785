//! The admin server: Kubernetes probes, `/status` and `/metrics`.
//!
//! * `GET /livez`: 200 while every event loop of the process is responsive
//!   (each ticks a heartbeat); never depends on dependencies, so a database
//!   outage cannot make Kubernetes restart the sidecar.
//! * `GET /readyz`: 200 in `in_service` and (by default) `degraded`, 503 otherwise.
//! * `GET /startupz`: 200 once every dependency has had a first verdict.
//! * `GET /status`: JSON: service state, each dependency, each listener.
//! * `GET /metrics`: Prometheus text (OpenMetrics when asked for in `Accept`).
//! * `GET /`: the status page for humans ([`page`]).
//! * `/control/...`: the authenticated runtime control API ([`api`]); it
//!   exists only when `admin.control.token_file` is set.
//! * `GET /fleet/view`: this instance's verdicts for its peers (only with a
//!   `fleet` section; see `crate::fleet`).
//! * `grpc.health.v1.Health/Check` and `/Watch` over HTTP/2 prior knowledge
//!   on the same port ([`conn`], [`crate::grpc::health`]).
//!
//! It runs on its own thread and runtime (see `crate::server`) so that probes
//! answer even when the data plane is saturated, and holds at most
//! `admin.max_connections` connections ([`conns`]).

pub mod api;
pub mod conn;
pub mod conns;
pub mod grpc;
pub mod page;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::config::{AdminConfig, Config};
use crate::control::{Auth, Control};
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::state::{Admission, Health, History, MAINTENANCE_BIT, ServiceState, age};

/// Heartbeats of the process's event loops, for `/livez`.
pub struct Heartbeats {
    base: Instant,
    loops: Vec<(String, AtomicU64)>,
}

impl Heartbeats {
    /// One heartbeat slot per named event loop.
    pub fn new(names: impl IntoIterator<Item = String>) -> Arc<Heartbeats> {
        let base = Instant::now();
        Arc::new(Heartbeats { base, loops: names.into_iter().map(|n| (n, AtomicU64::new(0))).collect() })
    }

    /// Ticks slot `i` every second until the runtime it runs on stops.
    pub async fn beat(self: Arc<Self>, i: usize) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.loops[i].1.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// Names of the loops that have not ticked within `stall`.
    pub fn stalled(&self, stall: Duration) -> Vec<&str> {
        let now = self.base.elapsed().as_millis() as u64;
        self.loops
            .iter()
            .filter(|(_, t)| now.saturating_sub(t.load(Ordering::Relaxed)) > stall.as_millis() as u64)
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

/// What the admin handlers read.
pub struct Admin {
    /// The admin server's own settings (a reload cannot change them).
    config: AdminConfig,
    /// What a reload changes: probe policies, listeners and routes, the config hash.
    live: ArcSwap<Live>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    heartbeats: Arc<Heartbeats>,
    /// The overrides (always present: `/status` and the page show them).
    control: Arc<Control>,
    /// The token check; `None` = the control API does not exist.
    auth: Option<Auth>,
    /// The fleet view and readiness policy, with a `fleet` section.
    fleet: Option<Arc<Fleet>>,
    /// The outcome of the last reload, for `/status`.
    last_reload: std::sync::Mutex<serde_json::Value>,
}

/// The part of the admin state that follows the config in force.
struct Live {
    /// `ready_when_*`, `liveness_stall`.
    config: AdminConfig,
    listeners: Vec<serde_json::Value>,
    /// Per listener: (route name, needs mask), for live per-route admission.
    routes: Vec<Vec<(String, u64)>>,
    /// The hash of the config file in force.
    config_hash: String,
}

impl Live {
    /// `bits[i]` is the mask bit of dependency `i` of `config`.
    fn new(config: &Config, bound: &[SocketAddr], bits: &[usize]) -> Live {
        let listeners = config
            .listeners
            .iter()
            .zip(bound)
            .map(|(l, addr)| {
                let needs: Vec<&str> = l.needs.iter().map(|i| config.dependencies[*i].name.as_str()).collect();
                json!({
                    "name": l.name,
                    "protocol": l.protocol,
                    "listen": addr.to_string(),
                    "upstream": l.upstream.to_string(),
                    "needs": needs,
                    "bypass": l.bypass,
                })
            })
            .collect();
        let gate = |needs: &[usize]| crate::state::gate_mask_of(bits, needs);
        let routes = config
            .listeners
            .iter()
            .map(|l| {
                l.routes
                    .iter()
                    .map(|r| (r.name.clone(), if r.bypass { 0 } else { gate(&r.needs) }))
                    .chain(std::iter::once(("default".to_string(), gate(&l.needs))))
                    .collect()
            })
            .collect();
        Live { config: config.admin.clone(), listeners, routes, config_hash: config.hash_hex() }
    }
}

impl Admin {
    /// Builds the admin state; `bound` are the listeners' actual addresses.
    pub fn new(
        config: &Config,
        bound: &[SocketAddr],
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        heartbeats: Arc<Heartbeats>,
        control: Arc<Control>,
        fleet: Option<Arc<Fleet>>,
    ) -> Arc<Admin> {
        let bits: Vec<usize> = (0..config.dependencies.len()).collect();
        let live = ArcSwap::from_pointee(Live::new(config, bound, &bits));
        let auth = config.admin.control.as_ref().map(|c| Auth::new(c, metrics.clone()));
        Arc::new(Admin {
            config: config.admin.clone(),
            live,
            health,
            metrics,
            heartbeats,
            control,
            auth,
            fleet,
            last_reload: std::sync::Mutex::new(serde_json::Value::Null),
        })
    }

    /// Follows a reload: `bits[i]` is the mask bit of dependency `i` of `config`.
    pub fn reconfigure(&self, config: &Config, bound: &[SocketAddr], bits: &[usize]) {
        self.live.store(Arc::new(Live::new(config, bound, bits)));
    }

    /// Records the outcome of a reload for `/status`.
    pub fn set_last_reload(&self, v: serde_json::Value) {
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }

    /// Whether `/readyz` answers 200 in `state`.
    pub fn ready(&self, state: ServiceState) -> bool {
        match state {
            ServiceState::InService => true,
            ServiceState::Degraded => self.live.load().config.ready_when_degraded,
            ServiceState::OutOfService => {
                let local = self.live.load().config.ready_when_out_of_service;
                match &self.fleet {
                    Some(f) => f.ready_out_of_service(local),
                    None => local,
                }
            }
            ServiceState::Starting | ServiceState::Draining | ServiceState::Maintenance => false,
        }
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        let (state, since) = self.health.service_state();
        let deps: Vec<serde_json::Value> = self
            .health
            .deps()
            .iter()
            .map(|d| {
                let i = d.bit;
                let status = d.status();
                let checked = status.state;
                let for_seconds = age(status.since).as_secs_f64();
                let mut v = serde_json::to_value(status).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("name".into(), json!(d.name));
                    o.insert("type".into(), json!(d.kind));
                    o.insert("impact".into(), json!(d.impact));
                    // `state` is what gating uses; `checked_state` what the check says.
                    // Both from the one snapshot `since` and the counts come from: a
                    // second read could see a verdict published in between, with
                    // the previous verdict's `since`.
                    o.insert("state".into(), json!(self.health.effective_of(i, checked)));
                    o.insert("checked_state".into(), json!(checked));
                    o.insert("forced".into(), json!(self.health.force(i)));
                    o.insert("for_seconds".into(), json!(for_seconds));
                    o.insert("admitted_share".into(), json!(self.health.admitted_share(i)));
                }
                v
            })
            .collect();
        let fleet = self.fleet.as_ref().map(|f| f.status());
        json!({
            "fleet": fleet,
            "service": {
                "state": state,
                "since": humantime::format_rfc3339_millis(since).to_string(),
                "for_seconds": age(since).as_secs_f64(),
                "ready": self.ready(state),
                "started": self.health.first_round_done(),
            },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": age(self.health.started()).as_secs_f64(),
            "dependencies": deps,
            "listeners": self.listeners_status(),
            "overrides": self.control.to_json(),
            "control_enabled": self.auth.is_some(),
            "config": {
                "hash": self.live.load().config_hash,
                "last_reload": *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()),
            },
        })
    }

    /// The listeners, each with its routes and whether each is admitted now.
    fn listeners_status(&self) -> Vec<serde_json::Value> {
        let live = self.live.load();
        live.listeners
            .iter()
            .zip(&live.routes)
            .map(|(l, routes)| {
                let routes: Vec<_> = routes
                    .iter()
                    .map(|(name, needs)| {
                        let (admitted, missing) = match self.health.gate(*needs) {
                            Admission::Admit => (true, 0),
                            Admission::Reject(_, m) => (false, m),
                        };
                        let needs = self.health.names(*needs);
                        let mut missing_names = self.health.names(missing);
                        if missing & MAINTENANCE_BIT != 0 {
                            missing_names.push("(maintenance)".into());
                        }
                        json!({ "name": name, "needs": needs, "admitted": admitted, "missing": missing_names })
                    })
                    .collect();
                let mut l = l.clone();
                l["routes"] = json!(routes);
                l
            })
            .collect()
    }

    /// The recent check results of each dependency, in config order.
    fn histories(&self) -> Vec<History> {
        self.health.deps().iter().map(|d| d.status().history).collect()
    }

    /// Answers one request; `peer` is only logged (failed authentication).
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if path == "/control" || path.starts_with("/control/") {
            return match &self.auth {
                Some(auth) => api::handle(&self.control, auth, req, peer).await,
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            };
        }
        self.handle_read_only(&req)
    }

    /// The read-only endpoints.
    fn handle_read_only(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match req.uri().path() {
            "/" => page::response(&page::render(&self.status(), &self.histories())),
            "/livez" => {
                let stalled = self.heartbeats.stalled(self.live.load().config.liveness_stall);
                if stalled.is_empty() {
                    text(StatusCode::OK, "ok\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, format!("stalled event loops: {}\n", stalled.join(", ")))
                }
            }
            "/readyz" => {
                let state = self.health.service_state().0;
                let code = if self.ready(state) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                text(code, format!("{}\n", state.as_str()))
            }
            "/startupz" => {
                if self.health.first_round_done() {
                    text(StatusCode::OK, "started\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "first check round not complete\n")
                }
            }
            "/status" => {
                let body = serde_json::to_vec_pretty(&self.status()).unwrap_or_default();
                with_type(StatusCode::OK, "application/json", body)
            }
            "/fleet/view" => match &self.fleet {
                Some(f) => with_type(StatusCode::OK, "application/json", f.view_json()),
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            },
            "/metrics" => {
                let accept = req.headers().get(hyper::header::ACCEPT).and_then(|a| a.to_str().ok()).unwrap_or("");
                if accept.contains("application/openmetrics-text") {
                    with_type(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        self.metrics.render_openmetrics(),
                    )
                } else {
                    with_type(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        self.metrics.render_prometheus(),
                    )
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn with_type(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", body)
}

/// Serves the admin endpoints on `listener` forever.
///
/// At most `admin.max_connections` connections are open: at the cap, the
/// oldest connection not in the middle of a request is closed to admit the
/// new one, so a new connection (every kubelet probe is one) is always
/// served while idle or slow clients are shed. Each connection's read buffer
/// is bounded, and a connection that does not complete a request head within
/// `header_read_timeout` (an idle keep-alive one included) is closed.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let table = conns::Table::new(admin.config.max_connections);
    let limits = conn::limits(&admin.config);
    tokio::spawn(admin.control.clone().run_expiry());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = table.admit() else {
            // Every connection is mid-request: refuse this one rather than exceed the cap.
            drop(stream);
            continue;
        };
        if slot.shed_another {
            admin.metrics.admin_connections_shed.inc();
        }
        tokio::spawn(conn::serve(stream, peer, admin.clone(), slot, table.clone(), limits.clone()));
        // Let the I/O driver run (a yield is deferred until it has) and the
        // new connection read its request before the next accept: under a
        // flood of connects, a probe is served rather than shed as the
        // oldest idle connection a few dozen accepts later.
        tokio::task::yield_now().await;
    }
}
