//! Config reload without a restart (docs/reload.md).
//!
//! A reload is asked for by SIGHUP, by `POST /control/reload`, or by the
//! file watch, which reads the config file through its symlinks every
//! `reload.poll_interval` and reloads when the content's hash changes (a
//! Kubernetes ConfigMap volume swaps a `..data` symlink; watching the file's
//! own inode would miss that, reading the resolved content cannot).
//!
//! One task, the [`Reloader`] on the monitor runtime, runs reloads one at a
//! time: read, validate, [`diff`] against the config in force, refuse a
//! change that needs a restart (naming the key), then apply:
//!
//! 1. the monitors of changed dependencies stop (closing their connections);
//! 2. [`Health::prepare`] lays out the new dependencies: a kept one keeps its
//!    mask bit, a new one gets a bit nobody in force uses;
//! 3. the monitors of changed and added dependencies start; an added one's
//!    first verdict is awaited (bounded by its timeout), so it is never
//!    "unknown" once in force;
//! 4. [`Health::commit`] puts the new dependencies in force, then each
//!    worker's listener context is swapped (one atomic store each): a request
//!    loads its context once, so it runs wholly under the old config or the new;
//! 5. the admin policies follow, the monitors of removed dependencies stop.
//!
//! An unchanged dependency is not touched: same check, same connection,
//! same verdict and counters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::admin::Admin;
use crate::check::AnyCheck;
use crate::config::{Config, ConfigError, DependencyConfig, ListenerConfig, ListenerProtocol};
use crate::control::{Control, ReloadAsk};
use crate::metrics::{DepLabels, Metrics, ResultLabels};
use crate::monitor::{self, CANCEL_GRACE};
use crate::proxy::{ListenerCtx, LiveCtx};
use crate::state::{DepHealth, DepSlot, Health, Keep};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read or is not a valid config (every problem, with
    /// file, line, column and key, as at startup).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The new config changes settings that only a restart applies.
    #[error("{}", render_refused(.0))]
    NeedsRestart(Vec<Refused>),
    /// The dependencies cannot be laid out in the masks.
    #[error("{0}")]
    Layout(#[from] crate::state::LayoutError),
}

fn render_refused(r: &[Refused]) -> String {
    let keys: Vec<String> = r.iter().map(|r| format!("{}: {}", r.key, r.message)).collect();
    format!("{}; a restart is needed to apply them", keys.join("; "))
}

/// A changed setting a reload does not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The key path, as config errors name it (`listeners[0].listen`).
    pub key: String,
    /// What changed.
    pub message: String,
}

/// What a reload changes, from [`diff`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Per dependency of the new config, in its order: how it relates to the old one.
    pub deps: Vec<Keep>,
    /// Names of the old dependencies the new config does not have.
    pub removed: Vec<String>,
    /// Changes that need a restart; when not empty, the reload is refused.
    pub refused: Vec<Refused>,
}

impl Plan {
    /// Names of the new config's dependencies with a given [`Keep`].
    pub fn names<'a>(&self, new: &'a Config, keep: Keep) -> Vec<&'a str> {
        new.dependencies.iter().zip(&self.deps).filter(|(_, k)| **k == keep).map(|(d, _)| d.name.as_str()).collect()
    }
}

/// Compares the config in force with a new one: which dependencies are kept
/// as they are, restarted, added or removed, and which changes need a restart.
///
/// Applied live: dependencies (any key), routes, `needs`, `bypass`,
/// `max_body_bytes`, `short_circuit`, a TCP listener's `reject` and
/// `admit_degraded`, `admin.ready_when_*`, `admin.liveness_stall`,
/// `admin.control.max_ttl`, `reload`. Refused: `workers`, the listener set
/// (names, order, protocol, listen), the other per-listener connection
/// settings, the admin server's own settings and `drain`.
pub fn diff(old: &Config, new: &Config) -> Plan {
    let deps = new
        .dependencies
        .iter()
        .map(|d| match old.dependencies.iter().find(|o| o.name == d.name) {
            Some(o) if o == d => Keep::Same,
            Some(_) => Keep::Restart,
            None => Keep::New,
        })
        .collect();
    let removed = old
        .dependencies
        .iter()
        .filter(|o| new.dependencies.iter().all(|d| d.name != o.name))
        .map(|o| o.name.clone())
        .collect();
    let mut refused = Vec::new();
    let mut refuse = |key: String, what: String| refused.push(Refused { key, message: what });
    if old.workers != new.workers {
        refuse("workers".into(), format!("changed from {} to {}", old.workers, new.workers));
    }
    let (oa, na) = (&old.admin, &new.admin);
    if oa.listen != na.listen {
        refuse("admin.listen".into(), format!("changed from {} to {}", oa.listen, na.listen));
    }
    if oa.max_connections != na.max_connections {
        refuse("admin.max_connections".into(), "changed".into());
    }
    if oa.header_read_timeout != na.header_read_timeout {
        refuse("admin.header_read_timeout".into(), "changed".into());
    }
    if oa.grpc != na.grpc {
        refuse("admin.grpc".into(), "changed".into());
    }
    if oa.control.as_ref().map(|c| &c.token_file) != na.control.as_ref().map(|c| &c.token_file) {
        refuse("admin.control.token_file".into(), "added, removed or changed".into());
    }
    if old.drain != new.drain {
        refuse("drain".into(), "changed".into());
    }
    if old.fleet != new.fleet {
        refuse("fleet".into(), "added, removed or changed".into());
    }
    // The fleet's per-dependency state (consensus, settle time, impact) is
    // laid out at start, in config order.
    let fleet_shape = |c: &Config| -> Vec<_> {
        c.dependencies.iter().map(|d| (d.name.clone(), d.impact, d.interval, d.timeout)).collect()
    };
    if new.fleet.is_some() && fleet_shape(old) != fleet_shape(new) {
        refuse(
            "dependencies".into(),
            "with a fleet section, dependencies cannot be added, removed, reordered or change impact, interval or timeout"
                .into(),
        );
    }
    if old.listeners.len() != new.listeners.len() {
        refuse(
            "listeners".into(),
            format!(
                "{} listeners instead of {}: listeners cannot be added or removed",
                new.listeners.len(),
                old.listeners.len()
            ),
        );
    }
    for (i, (o, n)) in old.listeners.iter().zip(&new.listeners).enumerate() {
        for (key, what) in listener_changes(o, n) {
            refuse(format!("listeners[{i}].{key}"), what);
        }
    }
    Plan { deps, removed, refused }
}

/// The settings of a listener that differ and that a reload does not apply
/// (key, what): its socket, and for an HTTP listener the app's address and
/// protocol, which each worker's pooled or multiplexed app connections are
/// made for. Everything else, a TCP listener's `upstream` included, is taken
/// by each request or connection from the config in force when it starts.
fn listener_changes(o: &ListenerConfig, n: &ListenerConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut check = |key: &'static str, same: bool| {
        if !same {
            out.push((key, "changed".to_string()));
        }
    };
    check("name", o.name == n.name);
    check("protocol", o.protocol == n.protocol);
    check("listen", o.listen == n.listen);
    if o.protocol == ListenerProtocol::Http {
        check("upstream", o.upstream == n.upstream);
        check("upstream_protocol", o.http.upstream_protocol == n.http.upstream_protocol);
    }
    out
}

/// What asked for a reload (the `trigger` field of its log event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// `POST /control/reload`.
    Api,
    /// The file watch saw a new content.
    Watch,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::Api => "api",
            Trigger::Watch => "file_watch",
        }
    }
}

/// A running monitor task and the switch that stops it.
struct Monitor {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Monitor {
    /// Stops the task; it closes its check's connection cleanly (bounded by
    /// its timeout, at most 2 s, see [`monitor::monitor`]).
    async fn stop(self) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Everything a reload changes, and the loop that runs reloads.
pub struct Reloader {
    current: Config,
    /// The hash of the file content last tried (in force or refused), so a
    /// refused file is not retried by the watch until it changes again.
    last_seen: u64,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
    admin: Arc<Admin>,
    bound: Vec<SocketAddr>,
    /// Per listener, per worker: the context the worker reads.
    lives: Vec<Vec<LiveCtx>>,
    monitors: HashMap<String, Monitor>,
}

/// The sending side of the reloader's queue: SIGHUP and the control API.
pub type ReloadSender = mpsc::Sender<ReloadAsk>;

impl Reloader {
    /// Takes over the config in force and starts one monitor per dependency.
    /// Must run on the monitor runtime (it spawns the monitors there).
    pub fn start(
        config: Config,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        control: Arc<Control>,
        admin: Arc<Admin>,
        bound: Vec<SocketAddr>,
        lives: Vec<Vec<LiveCtx>>,
    ) -> Reloader {
        let mut r = Reloader {
            last_seen: config.hash,
            current: config,
            health,
            metrics,
            control,
            admin,
            bound,
            lives,
            monitors: HashMap::new(),
        };
        let deps = r.health.deps();
        for (slot, dep) in deps.iter().zip(r.current.dependencies.clone()) {
            r.spawn_monitor(slot.clone(), dep);
        }
        r
    }

    fn spawn_monitor(&mut self, slot: Arc<DepSlot>, dep: DependencyConfig) {
        let (stop, stop_rx) = watch::channel(false);
        let check = AnyCheck::new(&dep);
        let name = dep.name.clone();
        let task = tokio::spawn(monitor::monitor(slot, dep, check, self.health.clone(), self.metrics.clone(), stop_rx));
        self.monitors.insert(name, Monitor { stop, task });
    }

    /// Serves reload requests and watches the file until `stop`; then stops
    /// every monitor (each closes its connection cleanly).
    pub async fn run(mut self, mut asks: mpsc::Receiver<ReloadAsk>, mut stop: watch::Receiver<bool>) {
        let mut poll_every = self.current.reload.poll_interval;
        let mut poll = poll_timer(poll_every);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                Some(ask) = asks.recv() => {
                    let trigger = if ask.by == SIGHUP_BY { Trigger::Signal } else { Trigger::Api };
                    let outcome = self.reload(trigger, None).await.map_err(|e| e.to_string());
                    let _ = ask.reply.send(outcome);
                }
                _ = poll.tick(), if !poll_every.is_zero() => {
                    if let Some(text) = self.changed_file().await {
                        let _ = self.reload(Trigger::Watch, Some(text)).await;
                    }
                }
            }
            if self.current.reload.poll_interval != poll_every {
                poll_every = self.current.reload.poll_interval;
                poll = poll_timer(poll_every);
            }
        }
        let all: Vec<Monitor> = self.monitors.drain().map(|(_, m)| m).collect();
        for m in &all {
            m.stop.send_replace(true);
        }
        for m in all {
            m.stop().await;
        }
    }

    /// The file's text when its content differs from the last one tried.
    async fn changed_file(&mut self) -> Option<String> {
        // Read through the symlinks every time: a ConfigMap update replaces
        // the `..data` link, not the file the path names.
        let text = tokio::fs::read_to_string(&self.current.path).await.ok()?;
        let hash = crate::config::reload::hash(&text);
        (hash != self.last_seen).then_some(text)
    }

    /// One reload: validate, refuse or apply; metrics, `/status` and one log event.
    pub async fn reload(&mut self, trigger: Trigger, text: Option<String>) -> Result<serde_json::Value, ReloadError> {
        let result = self.try_reload(text).await;
        let m = &self.metrics.reload;
        let outcome = match &result {
            Ok(summary) => {
                m.reloads.get_or_create(&ResultLabels { result: "success".into() }).inc();
                m.last_successful.set(1);
                m.hash.set(self.current.hash as i64);
                let now = SystemTime::now();
                m.last_success.set(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64());
                info!(
                    trigger = trigger.as_str(), hash = %self.current.hash_hex(), path = %self.current.path.display(),
                    added = %list(&summary["added"]), removed = %list(&summary["removed"]),
                    restarted = %list(&summary["restarted"]), "config reloaded"
                );
                json!({
                    "result": "success", "trigger": trigger.as_str(), "hash": self.current.hash_hex(),
                    "at": humantime::format_rfc3339_seconds(now).to_string(),
                })
            }
            Err(e) => {
                m.reloads.get_or_create(&ResultLabels { result: "failure".into() }).inc();
                m.last_successful.set(0);
                error!(
                    trigger = trigger.as_str(), hash = %self.current.hash_hex(), error = %e,
                    "config reload failed; the config in force is unchanged"
                );
                json!({
                    "result": "failure", "trigger": trigger.as_str(), "hash": self.current.hash_hex(),
                    "at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(), "error": e.to_string(),
                })
            }
        };
        self.admin.set_last_reload(outcome);
        result
    }

    async fn try_reload(&mut self, text: Option<String>) -> Result<serde_json::Value, ReloadError> {
        let path = self.current.path.clone();
        let text = match text {
            Some(t) => t,
            None => tokio::fs::read_to_string(&path)
                .await
                .map_err(|source| ConfigError::Read { path: path.clone(), source })?,
        };
        self.last_seen = crate::config::reload::hash(&text);
        let new = Config::from_yaml(&text, &path)?;
        let plan = diff(&self.current, &new);
        if !plan.refused.is_empty() {
            return Err(ReloadError::NeedsRestart(plan.refused));
        }
        let summary = json!({
            "hash": new.hash_hex(),
            "added": plan.names(&new, Keep::New),
            "restarted": plan.names(&new, Keep::Restart),
            "removed": plan.removed,
        });
        self.apply(new, &plan).await?;
        Ok(summary)
    }

    async fn apply(&mut self, new: Config, plan: &Plan) -> Result<(), ReloadError> {
        // 1. A changed dependency's old check ends first (its connection
        //    closed cleanly); its verdict holds meanwhile.
        for (d, _) in new.dependencies.iter().zip(&plan.deps).filter(|(_, k)| **k == Keep::Restart) {
            if let Some(m) = self.monitors.remove(&d.name) {
                m.stop().await;
            }
        }
        // 2. Lay out the new dependencies.
        let slots = match self.health.prepare(&new, &plan.deps) {
            Ok(s) => s,
            Err(e) => {
                // The restarted ones must run again under their old settings.
                for d in &self.current.dependencies.clone() {
                    if !self.monitors.contains_key(&d.name)
                        && let Some(slot) = self.health.deps().iter().find(|s| s.name == d.name)
                    {
                        self.spawn_monitor(slot.clone(), d.clone());
                    }
                }
                return Err(e.into());
            }
        };
        // 3. Start the new and changed checks; wait for the new ones' first verdict.
        let mut first = Vec::new();
        for ((slot, dep), keep) in slots.iter().zip(&new.dependencies).zip(&plan.deps) {
            if *keep == Keep::Same {
                continue;
            }
            if *keep == Keep::New {
                first.push((slot.subscribe(), dep.timeout + CANCEL_GRACE + Duration::from_millis(500)));
            }
            self.spawn_monitor(slot.clone(), dep.clone());
        }
        for (mut rx, bound) in first {
            let _ = tokio::time::timeout(bound, rx.wait_for(|s| s.state != DepHealth::Unknown)).await;
        }
        // 4. Put them in force, then swap each worker's listener context.
        let bits: Vec<usize> = slots.iter().map(|s| s.bit).collect();
        let old_slots = self.health.deps();
        self.health.commit(slots);
        for (i, workers) in self.lives.iter().enumerate() {
            for live in workers {
                live.store(ListenerCtx::with_bits(&new, i, self.health.clone(), self.metrics.clone(), &bits));
            }
        }
        // 5. Admin policies; removed dependencies.
        self.admin.reconfigure(&new, &self.bound, &bits);
        self.control
            .set_max_ttl(new.admin.control.as_ref().map_or(crate::config::admin::DEFAULT_MAX_TTL, |c| c.max_ttl));
        let removed: Vec<(usize, String)> =
            old_slots.iter().filter(|s| plan.removed.contains(&s.name)).map(|s| (s.bit, s.name.clone())).collect();
        self.control.forget(&removed);
        for name in &plan.removed {
            if let Some(m) = self.monitors.remove(name) {
                m.stop().await;
            }
            if let Some(old) = self.current.dependencies.iter().find(|d| &d.name == name) {
                let labels = DepLabels { dependency: name.clone(), r#type: old.kind.type_name().into() };
                self.metrics.dependency_up.remove(&labels);
            }
        }
        self.current = new;
        Ok(())
    }
}

/// The `by` of the requests SIGHUP sends.
pub const SIGHUP_BY: &str = "SIGHUP";

fn poll_timer(every: Duration) -> tokio::time::Interval {
    let every = if every.is_zero() { Duration::from_secs(3600) } else { every };
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

fn list(v: &serde_json::Value) -> String {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(",")).unwrap_or_default()
}

/// Asks the reloader for a reload on SIGHUP (the answer is logged by the reloader).
pub async fn on_sighup(tx: &ReloadSender) {
    let (reply, rx) = tokio::sync::oneshot::channel();
    if tx.send(ReloadAsk { by: SIGHUP_BY.into(), reply }).await.is_ok() {
        let _ = rx.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml, Path::new("t.yaml")).unwrap()
    }

    const LISTENER: &str = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n";

    fn with_deps(deps: &[(&str, &str)]) -> String {
        let mut y = format!("{LISTENER}dependencies:\n");
        for (name, address) in deps {
            y.push_str(&format!("  - name: {name}\n    type: tcp\n    address: {address}\n"));
        }
        y
    }

    #[test]
    fn identical_configs_keep_every_dependency_and_refuse_nothing() {
        let a = config(&with_deps(&[("db", "db:1"), ("cache", "cache:2")]));
        let p = diff(&a, &a.clone());
        assert_eq!(p.deps, [Keep::Same, Keep::Same]);
        assert!(p.removed.is_empty() && p.refused.is_empty(), "{p:?}");
    }

    #[test]
    fn added_removed_changed_and_reordered_dependencies_are_told_apart_by_name() {
        let a = config(&with_deps(&[("db", "db:1"), ("cache", "cache:2"), ("old", "old:3")]));
        let b = config(&with_deps(&[("new", "new:4"), ("cache", "cache:9"), ("db", "db:1")]));
        let p = diff(&a, &b);
        assert_eq!(p.deps, [Keep::New, Keep::Restart, Keep::Same]);
        assert_eq!(p.removed, ["old"]);
        assert!(p.refused.is_empty(), "{p:?}");
    }

    #[test]
    fn a_changed_timing_or_impact_restarts_the_dependency() {
        let a = config(&with_deps(&[("db", "db:1")]));
        let b = config(&format!("{}    interval: 7s\n", with_deps(&[("db", "db:1")])));
        assert_eq!(diff(&a, &b).deps, [Keep::Restart]);
        let c = config(&format!("{}    impact: degraded\n", with_deps(&[("db", "db:1")])));
        assert_eq!(diff(&a, &c).deps, [Keep::Restart]);
    }

    #[test]
    fn routes_needs_bodies_and_body_limits_are_applied_not_refused() {
        let a = config(&with_deps(&[("db", "db:1")]));
        let b = config(&format!(
            "short_circuit:\n  retry_after: 9s\n{}    needs: []\n    max_body_bytes: 10\n    routes:\n      - name: api\n        match: {{path_prefix: /api}}\n        needs: [db]\ndependencies:\n  - name: db\n    type: tcp\n    address: db:1\n",
            LISTENER
        ));
        let p = diff(&a, &b);
        assert!(p.refused.is_empty(), "{p:?}");
    }

    #[test]
    fn listener_socket_and_protocol_settings_are_refused_naming_the_key() {
        let a = config(LISTENER);
        let b =
            config("workers: 3\nlisteners:\n  - name: web\n    listen: 127.0.0.1:9\n    upstream: 127.0.0.1:3001\n");
        let keys: Vec<String> = diff(&a, &b).refused.into_iter().map(|r| r.key).collect();
        assert!(keys.contains(&"listeners[0].listen".to_string()), "{keys:?}");
        assert!(keys.contains(&"workers".to_string()), "{keys:?}");
        assert!(keys.contains(&"listeners[0].upstream".to_string()), "{keys:?}");
        let c = config(&format!("{LISTENER}  - name: two\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n"));
        let p = diff(&a, &c);
        assert_eq!(p.refused[0].key, "listeners", "{p:?}");
        let msg = ReloadError::NeedsRestart(p.refused).to_string();
        assert!(msg.contains("restart"), "{msg}");
    }

    #[test]
    fn every_listener_option_but_its_socket_and_app_is_applied_not_refused() {
        let a = config(&format!(
            "{LISTENER}  - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n"
        ));
        let b = config(&format!(
            "{LISTENER}    max_connections: 5\n    idle_timeout: 9s\n    header_read_timeout: 3s\n    client_idle_timeout: 4s\n    \
             upstream_connect_timeout: 1s\n    upstream_response_timeout: 2s\n    upstream_idle_timeout: 5s\n    \
             upstream_pool_max_idle: 7\n    max_header_bytes: 9000\n    max_headers: 50\n    \
             http2_max_concurrent_streams: 10\n    http2_max_pending_accept_reset_streams: 5\n    \
             via: false\n    x_forwarded_for: false\n    x_forwarded_proto: false\n    http2: false\n    \
             abort_on_client_close: true\n  \
             - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: broker:5672\n    connect_timeout: 1s\n    \
             reject_delay: 2s\n    reject_hold_max: 9\n    max_connections: 3\n    on_outage: close_existing\n"
        ));
        let p = diff(&a, &b);
        assert!(p.refused.is_empty(), "{p:?}");
    }

    #[test]
    fn with_a_fleet_a_changed_dependency_set_or_fleet_section_is_refused() {
        let fleet = "fleet:\n  instance_id: a\n  peers:\n    static: [\"127.0.0.1:1\"]\n";
        let dep = |name: &str| format!("  - name: {name}\n    type: tcp\n    address: 127.0.0.1:1\n");
        let a = config(&format!("{LISTENER}dependencies:\n{}{fleet}", dep("db")));
        let b = config(&format!("{LISTENER}dependencies:\n{}{}{fleet}", dep("db"), dep("cache")));
        let keys: Vec<String> = diff(&a, &b).refused.into_iter().map(|r| r.key).collect();
        assert_eq!(keys, ["dependencies"]);
        let c = config(&format!("{LISTENER}dependencies:\n{}", dep("db")));
        let keys: Vec<String> = diff(&a, &c).refused.into_iter().map(|r| r.key).collect();
        assert_eq!(keys, ["fleet"]);
        // Without a fleet, the same dependency change is applied.
        let d = config(&format!("{LISTENER}dependencies:\n{}{}", dep("db"), dep("cache")));
        assert!(diff(&c, &d).refused.is_empty());
    }

    #[test]
    fn admin_policies_are_applied_and_the_admin_address_is_refused() {
        let a = config(LISTENER);
        let b = config(&format!("admin:\n  ready_when_degraded: false\n  liveness_stall: 30s\n{LISTENER}"));
        assert!(diff(&a, &b).refused.is_empty());
        let c = config(&format!("admin:\n  listen: 127.0.0.1:1\n{LISTENER}"));
        assert_eq!(diff(&a, &c).refused[0].key, "admin.listen");
        let d = config(&format!("drain:\n  delay: 1s\n{LISTENER}"));
        assert_eq!(diff(&a, &d).refused[0].key, "drain");
        let g = config(&format!("admin:\n  grpc:\n    enabled: false\n{LISTENER}"));
        assert_eq!(diff(&a, &g).refused[0].key, "admin.grpc");
    }
}
