//! healthgate: a sidecar health proxy.
//!
//! # Layout
//! * [`config`]: the YAML schema, validated once into typed structs.
//! * [`check`]: one module per protocol behind the [`check::Check`] trait.
//! * [`net`]: outbound connects (every resolved address tried) for checks and proxy.
//! * [`monitor`]: the loop that runs a check on its interval with jitter,
//!   timeout and rise/fall hysteresis, and publishes the verdict.
//! * [`state`]: the shared health state: one writer per dependency,
//!   lock-free reads on the request path.
//! * [`proxy`]: the data plane (HTTP and TCP listeners).
//! * [`routes`]: which dependencies a request needs (compiled route table).
//! * [`admin`]: probes, `/status`, `/metrics`, the status page and the
//!   control API on their own thread.
//! * [`grpc`]: the `grpc.health.v1.Health` service the admin port answers over h2c.
//! * [`control`]: operator overrides (drain, maintenance, forced verdicts)
//!   with TTLs and audit events; the control API's token check.
//! * [`ctl`]: the `healthgate ctl` client of the control API.
//! * [`fleet`]: peers' views of the dependencies, the fleet readiness
//!   policy and the slow-start ramp.
//! * [`metrics`]: the Prometheus registry.
//! * [`reload`]: config reload on SIGHUP, the control API or a changed file.
//! * [`server`]: wires the threads together and runs the drain on SIGTERM.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod check;
pub mod config;
pub mod control;
pub mod ctl;
pub mod fleet;
pub mod grpc;
pub mod metrics;
pub mod monitor;
pub mod net;
pub mod oneshot;
pub mod proxy;
pub mod reload;
pub mod routes;
pub mod server;
pub mod state;
