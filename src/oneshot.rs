//! The one-shot commands: `healthgate check` (one round of every check) and
//! `healthgate wait` (block until in service, for init containers).

use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use crate::check::{AnyCheck, Check, CheckError};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::monitor;
use crate::state::{DepHealth, DepStatus, Health, ServiceState};

/// The result of one check of one dependency.
pub struct RoundResult {
    /// Dependency name.
    pub name: String,
    /// Dependency type.
    pub kind: &'static str,
    /// Its impact.
    pub impact: &'static str,
    /// Pass or the failure.
    pub result: Result<(), CheckError>,
    /// How long the check took.
    pub latency: Duration,
}

/// Runs every check once, concurrently, each within its timeout, and derives
/// the service state those results would give.
pub async fn check_round(config: &Config) -> (Vec<RoundResult>, ServiceState) {
    let mut runs = tokio::task::JoinSet::new();
    for (i, dep) in config.dependencies.iter().cloned().enumerate() {
        runs.spawn(async move {
            let mut check = AnyCheck::new(&dep);
            let (result, latency) = monitor::run_once(&mut check, dep.timeout).await;
            check.close(tokio::time::Instant::now() + dep.timeout).await;
            let r = RoundResult {
                name: dep.name,
                kind: dep.kind.type_name(),
                impact: dep.impact.as_str(),
                result,
                latency,
            };
            (i, r)
        });
    }
    let mut results: Vec<(usize, RoundResult)> = runs.join_all().await;
    results.sort_by_key(|(i, _)| *i);
    let health = Health::new(config);
    for (i, r) in &results {
        let state = if r.result.is_ok() { DepHealth::Up } else { DepHealth::Down };
        health.publish(*i, DepStatus { state, ..DepStatus::unknown() });
    }
    (results.into_iter().map(|(_, r)| r).collect(), health.compute_service_state())
}

/// Renders the results of [`check_round`] as a table.
pub fn render_table(results: &[RoundResult], state: ServiceState) -> String {
    let mut rows = vec![[
        "DEPENDENCY".to_string(),
        "TYPE".into(),
        "IMPACT".into(),
        "RESULT".into(),
        "LATENCY".into(),
        "DETAIL".into(),
    ]];
    for r in results {
        let (result, detail) = match &r.result {
            Ok(()) => ("up".to_string(), String::new()),
            Err(e) => (format!("down ({})", e.cause), e.message.clone()),
        };
        rows.push([
            r.name.clone(),
            r.kind.into(),
            r.impact.into(),
            result,
            format!("{:.1}ms", r.latency.as_secs_f64() * 1000.0),
            detail,
        ]);
    }
    let widths: Vec<usize> = (0..5).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &rows {
        for c in 0..5 {
            out.push_str(&format!("{:<w$}  ", r[c], w = widths[c]));
        }
        out.push_str(&r[5]);
        out.push('\n');
    }
    out.push_str(&format!("service: {}\n", state.as_str()));
    out
}

/// Renders the results of [`check_round`] as JSON.
pub fn render_json(results: &[RoundResult], state: ServiceState) -> serde_json::Value {
    let deps: Vec<_> = results
        .iter()
        .map(|r| {
            json!({
                "name": r.name, "type": r.kind, "impact": r.impact, "up": r.result.is_ok(),
                "cause": r.result.as_ref().err().map(|e| e.cause),
                "message": r.result.as_ref().err().map(|e| e.message.clone()),
                "latency_seconds": r.latency.as_secs_f64(),
            })
        })
        .collect();
    json!({ "service": state, "dependencies": deps })
}

/// Exit code of `check`: 0 in service, 1 otherwise.
pub fn exit_code(state: ServiceState) -> i32 {
    if state == ServiceState::InService { 0 } else { 1 }
}

/// Runs the monitors (no proxy) until the service is in service — or also
/// degraded when `allow_degraded` — or `timeout` passes. Returns whether it got there.
pub async fn wait(config: &Config, timeout: Duration, allow_degraded: bool) -> bool {
    let health = Health::new(config);
    let metrics = Metrics::new(config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut monitors = tokio::task::JoinSet::new();
    for (slot, dep) in health.deps().iter().zip(&config.dependencies) {
        let check = AnyCheck::new(dep);
        let (slot, dep) = (slot.clone(), dep.clone());
        monitors.spawn(monitor::monitor(slot, dep, check, health.clone(), metrics.clone(), stop_rx.clone()));
    }
    let aggregator = tokio::spawn(monitor::aggregate(health.clone(), metrics));
    let mut states = health.subscribe_service();
    let ok = |s: ServiceState| s == ServiceState::InService || (allow_degraded && s == ServiceState::Degraded);
    let reached = tokio::time::timeout(timeout, states.wait_for(|(s, _)| ok(*s))).await.is_ok();
    // Let the monitors close their connections cleanly (bounded).
    stop_tx.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), monitors.join_all()).await;
    aggregator.abort();
    reached
}
