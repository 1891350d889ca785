//! The admin server: Kubernetes probes, `/status` and `/metrics`.
//!
//! * `GET /livez`: 200 while every event loop of the process is responsive
//!   (each ticks a heartbeat); never depends on dependencies, so a database
//!   outage cannot make Kubernetes restart the sidecar.
//! * `GET /readyz`: 200 in `in_service` and (by default) `degraded`, 503 otherwise.
//! * `GET /startupz`: 200 once every dependency has had a first verdict.
//! * `GET /status`: JSON: service state, each dependency, each listener.
//! * `GET /metrics`: Prometheus text (OpenMetrics when asked for in `Accept`).
//!
//! It runs on its own thread and runtime (see `crate::server`) so that probes
//! answer even when the data plane is saturated.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::config::{AdminConfig, Config};
use crate::metrics::Metrics;
use crate::state::{Admission, Health, ServiceState, age};

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
    config: AdminConfig,
    listeners: Vec<serde_json::Value>,
    /// Per listener: (route name, needs mask), for live per-route admission.
    routes: Vec<Vec<(String, u64)>>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    heartbeats: Arc<Heartbeats>,
}

impl Admin {
    /// Builds the admin state; `bound` are the listeners' actual addresses.
    pub fn new(
        config: &Config,
        bound: &[SocketAddr],
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        heartbeats: Arc<Heartbeats>,
    ) -> Arc<Admin> {
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
        let routes = config
            .listeners
            .iter()
            .map(|l| {
                l.routes
                    .iter()
                    .map(|r| (r.name.clone(), Health::mask(&r.needs)))
                    .chain(std::iter::once(("default".to_string(), Health::mask(&l.needs))))
                    .collect()
            })
            .collect();
        Arc::new(Admin { config: config.admin.clone(), listeners, routes, health, metrics, heartbeats })
    }

    /// Whether `/readyz` answers 200 in `state`.
    pub fn ready(&self, state: ServiceState) -> bool {
        match state {
            ServiceState::InService => true,
            ServiceState::Degraded => self.config.ready_when_degraded,
            ServiceState::OutOfService => self.config.ready_when_out_of_service,
            ServiceState::Starting | ServiceState::Draining => false,
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
                let mut v = serde_json::to_value(d.status()).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("name".into(), json!(d.name));
                    o.insert("type".into(), json!(d.kind));
                    o.insert("impact".into(), json!(d.impact));
                }
                v
            })
            .collect();
        json!({
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
        })
    }

    /// The listeners, each with its routes and whether each is admitted now.
    fn listeners_status(&self) -> Vec<serde_json::Value> {
        self.listeners
            .iter()
            .zip(&self.routes)
            .map(|(l, routes)| {
                let routes: Vec<_> = routes
                    .iter()
                    .map(|(name, needs)| {
                        let (admitted, missing) = match self.health.admission(*needs) {
                            Admission::Admit => (true, 0),
                            Admission::Reject(_, m) => (false, m),
                        };
                        let needs: Vec<&str> = self.health.names(*needs).collect();
                        let missing: Vec<&str> = self.health.names(missing).collect();
                        json!({ "name": name, "needs": needs, "admitted": admitted, "missing": missing })
                    })
                    .collect();
                let mut l = l.clone();
                l["routes"] = json!(routes);
                l
            })
            .collect()
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match req.uri().path() {
            "/livez" => {
                let stalled = self.heartbeats.stalled(self.config.liveness_stall);
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
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = admin.handle(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            let _ = conn.await;
        });
    }
}
