//! Runtime control: an operator drains the pod, puts it in maintenance, or
//! forces one dependency's verdict up or down, each with a mandatory,
//! bounded TTL and a reason. Every change and every expiry is one audit
//! event. Also the bearer-token check of the control API and the rate limit
//! of its failures.
//!
//! The overrides are applied to [`Health`]'s masks ([`Health::set_mode`],
//! [`Health::set_force`]), so the request path sees them with the load it
//! already does; this module keeps who set them, why and until when.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use std::sync::OnceLock;

use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{ControlConfig, read_token};
use crate::metrics::{KindLabels, Metrics};
use crate::state::{Force, Health, Mode};

/// Longest a control call waits for the service state to show its change.
const SETTLE_BOUND: Duration = Duration::from_secs(1);

/// Longest `reason` accepted.
pub const MAX_REASON_LEN: usize = 256;
/// Longest `by` label accepted.
pub const MAX_BY_LEN: usize = 64;

/// Why a control request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// No TTL given: every override must end by itself.
    #[error("ttl is required (e.g. \"10m\")")]
    TtlMissing,
    /// The TTL is not a duration.
    #[error("ttl {0:?} is not a duration (e.g. \"10m\")")]
    TtlInvalid(String),
    /// The TTL is zero or longer than `admin.control.max_ttl`.
    #[error("ttl must be more than 0 and at most {}", humantime::format_duration(*.0))]
    TtlOutOfRange(Duration),
    /// No reason given.
    #[error("reason is required")]
    ReasonMissing,
    /// A text field is too long or holds control characters.
    #[error("{0} must be at most {1} characters without control characters")]
    BadText(&'static str, usize),
    /// No such dependency.
    #[error("unknown dependency {0:?}")]
    UnknownDependency(String),
    /// The body is not the expected JSON.
    #[error("invalid request body: {0}")]
    BadBody(String),
    /// A reload was refused (invalid file, a change that needs a restart); nothing changed.
    #[error("reload refused, the config in force is unchanged: {0}")]
    Reload(String),
}

/// Who set an override, why, and until when.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// The caller-supplied label.
    pub by: String,
    /// Why.
    pub reason: String,
    /// For how long it was granted.
    pub ttl: Duration,
    /// Wall-clock time it was set.
    pub set_at: SystemTime,
    /// Wall-clock time it ends.
    pub expires_at: SystemTime,
    /// Monotonic time it ends (what expiry is decided on).
    pub deadline: Instant,
}

impl Grant {
    /// A grant starting at `now` for `ttl`.
    pub fn new(by: String, reason: String, ttl: Duration, now: Instant) -> Grant {
        let set_at = SystemTime::now();
        Grant { by, reason, ttl, set_at, expires_at: set_at + ttl, deadline: now + ttl }
    }

    /// Its `/status` form.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "by": self.by,
            "reason": self.reason,
            "ttl_seconds": self.ttl.as_secs_f64(),
            "set_at": humantime::format_rfc3339_seconds(self.set_at).to_string(),
            "expires_at": humantime::format_rfc3339_seconds(self.expires_at).to_string(),
            "expires_in_seconds": self.deadline.saturating_duration_since(Instant::now()).as_secs(),
        })
    }
}

/// What a caller asks for: who, why, how long (the raw TTL text, checked by [`Request::validate`]).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Caller-supplied label (`unknown` when absent).
    #[serde(default)]
    pub by: Option<String>,
    /// Why (required when setting).
    #[serde(default)]
    pub reason: Option<String>,
    /// How long, as a human duration (required when setting).
    #[serde(default)]
    pub ttl: Option<String>,
}

/// A text field: bounded and free of control characters (it is logged and shown).
fn text(field: &'static str, value: &str, max: usize) -> Result<String, ControlError> {
    if value.chars().count() > max || value.chars().any(char::is_control) {
        return Err(ControlError::BadText(field, max));
    }
    Ok(value.trim().to_string())
}

impl Request {
    /// The label of the caller.
    pub fn by(&self) -> Result<String, ControlError> {
        match self.by.as_deref().map(str::trim) {
            None | Some("") => Ok("unknown".into()),
            Some(b) => text("by", b, MAX_BY_LEN),
        }
    }

    /// Checks the TTL (present, a duration, within `max_ttl`) and the reason.
    pub fn validate(&self, max_ttl: Duration) -> Result<(String, String, Duration), ControlError> {
        let ttl = self.ttl.as_deref().map(str::trim).filter(|t| !t.is_empty()).ok_or(ControlError::TtlMissing)?;
        let ttl = humantime::parse_duration(ttl).map_err(|_| ControlError::TtlInvalid(ttl.to_string()))?;
        if ttl.is_zero() || ttl > max_ttl {
            return Err(ControlError::TtlOutOfRange(max_ttl));
        }
        let reason =
            self.reason.as_deref().map(str::trim).filter(|r| !r.is_empty()).ok_or(ControlError::ReasonMissing)?;
        Ok((self.by()?, text("reason", reason, MAX_REASON_LEN)?, ttl))
    }
}

/// An override that ended by its TTL.
#[derive(Debug, Clone, PartialEq)]
pub enum Expired {
    /// The pod's drain or maintenance.
    Mode(Mode, Grant),
    /// A dependency's forced verdict.
    Force(usize, Force, Grant),
}

/// The active overrides; pure data, decided on with explicit `Instant`s.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Drain or maintenance.
    pub mode: Option<(Mode, Grant)>,
    /// Per dependency bit ([`crate::state::DepSlot::bit`]), its forced verdict.
    pub forces: Vec<Option<(Force, Grant)>>,
}

impl Overrides {
    /// Removes and returns every override whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired> {
        let mut out = Vec::new();
        if self.mode.as_ref().is_some_and(|(_, g)| g.deadline <= now)
            && let Some((m, g)) = self.mode.take()
        {
            out.push(Expired::Mode(m, g));
        }
        for (i, slot) in self.forces.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|(_, g)| g.deadline <= now)
                && let Some((f, g)) = slot.take()
            {
                out.push(Expired::Force(i, f, g));
            }
        }
        out
    }

    /// The earliest deadline of any active override.
    pub fn next_deadline(&self) -> Option<Instant> {
        let forces = self.forces.iter().flatten().map(|(_, g)| g.deadline);
        self.mode.iter().map(|(_, g)| g.deadline).chain(forces).min()
    }

    /// How many overrides of each kind of [`crate::metrics::OVERRIDE_KINDS`] are active.
    pub fn counts(&self) -> [i64; 4] {
        let mode = |m| self.mode.as_ref().is_some_and(|(x, _)| *x == m) as i64;
        let force = |f| self.forces.iter().flatten().filter(|(x, _)| *x == f).count() as i64;
        [mode(Mode::Drain), mode(Mode::Maintenance), force(Force::Up), force(Force::Down)]
    }
}

/// The runtime control state of the process.
pub struct Control {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// `admin.control.max_ttl` in force (a reload may change it).
    max_ttl: Mutex<Duration>,
    overrides: Mutex<Overrides>,
    /// Wakes the expiry task when a deadline may have moved earlier.
    changed: Notify,
    /// Where `POST /control/reload` sends its request (set once by the server).
    reload: OnceLock<mpsc::Sender<ReloadAsk>>,
}

/// A reload asked through the control API; the answer comes back on `reply`.
pub struct ReloadAsk {
    /// Who asked (audit).
    pub by: String,
    /// The outcome: the new config's summary, or why nothing changed.
    pub reply: oneshot::Sender<Result<serde_json::Value, String>>,
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Normal => "normal",
        Mode::Drain => "drain",
        Mode::Maintenance => "maintenance",
    }
}

fn force_name(f: Force) -> &'static str {
    match f {
        Force::Up => "up",
        Force::Down => "down",
    }
}

impl Control {
    /// Waits, at most [`SETTLE_BOUND`], until the aggregator has published the
    /// service state that the current verdicts, overrides and mode imply, so
    /// `/readyz` and `/status` read after a control call already reflect it.
    pub async fn settled(&self) {
        let mut published = self.health.subscribe_service();
        let _ = tokio::time::timeout(SETTLE_BOUND, async {
            while published.borrow_and_update().0 != self.health.compute_service_state() {
                if published.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// The control state for `health`; `max_ttl` bounds every TTL.
    pub fn new(health: Arc<Health>, metrics: Arc<Metrics>, max_ttl: Duration) -> Arc<Control> {
        let overrides = Overrides { mode: None, forces: vec![None; crate::config::MAX_DEPENDENCIES] };
        Arc::new(Control {
            health,
            metrics,
            max_ttl: Mutex::new(max_ttl),
            overrides: Mutex::new(overrides),
            changed: Notify::new(),
            reload: OnceLock::new(),
        })
    }

    fn max_ttl(&self) -> Duration {
        *self.max_ttl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a reloaded `admin.control.max_ttl` to later requests (active
    /// overrides keep the TTL they were granted).
    pub fn set_max_ttl(&self, max_ttl: Duration) {
        *self.max_ttl.lock().unwrap_or_else(|e| e.into_inner()) = max_ttl;
    }

    /// Drops the overrides of dependencies a reload removed (`bits` of their
    /// slots), one audit event each: a later dependency given the same bit
    /// must not inherit them.
    pub fn forget(&self, removed: &[(usize, String)]) {
        let mut o = self.lock();
        let mut any = false;
        for (bit, name) in removed {
            if let Some((f, g)) = o.forces.get_mut(*bit).and_then(Option::take) {
                any = true;
                info!(
                    target: "healthgate::audit", audit = "override_removed", dependency = %name, force = force_name(f),
                    by = %g.by, reason = %g.reason, "control: dependency override ended: the reload removed the dependency"
                );
            }
        }
        if any {
            self.publish_counts(&o);
        }
    }

    /// Connects `POST /control/reload` to the reloader.
    pub fn set_reloader(&self, tx: mpsc::Sender<ReloadAsk>) {
        let _ = self.reload.set(tx);
    }

    /// Reloads the config file now (`POST /control/reload`), with an audit
    /// event; waits for the outcome.
    pub async fn reload(&self, req: &Request) -> Result<serde_json::Value, ControlError> {
        let by = req.by()?;
        let reason = text("reason", req.reason.as_deref().unwrap_or(""), MAX_REASON_LEN)?;
        let tx = self.reload.get().ok_or_else(|| ControlError::Reload("reload is not available".into()))?;
        info!(target: "healthgate::audit", audit = "reload_requested", by = %by, reason = %reason, "control: config reload requested");
        let (reply, rx) = oneshot::channel();
        tx.send(ReloadAsk { by, reply }).await.map_err(|_| ControlError::Reload("the reloader stopped".into()))?;
        rx.await.map_err(|_| ControlError::Reload("the reloader stopped".into()))?.map_err(ControlError::Reload)
    }

    fn lock(&self) -> MutexGuard<'_, Overrides> {
        self.overrides.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the active overrides.
    pub fn overrides(&self) -> Overrides {
        self.lock().clone()
    }

    fn publish_counts(&self, o: &Overrides) {
        for (kind, n) in crate::metrics::OVERRIDE_KINDS.iter().zip(o.counts()) {
            self.metrics.overrides_active.get_or_create(&KindLabels { kind: (*kind).into() }).set(n);
        }
    }

    /// Puts the pod in `mode` (drain or maintenance) for the request's TTL.
    pub fn set_mode(&self, mode: Mode, req: &Request) -> Result<Grant, ControlError> {
        let (by, reason, ttl) = req.validate(self.max_ttl())?;
        let grant = Grant::new(by, reason, ttl, Instant::now());
        let mut o = self.lock();
        o.mode = Some((mode, grant.clone()));
        self.health.set_mode(mode);
        self.publish_counts(&o);
        drop(o);
        self.changed.notify_one();
        info!(
            target: "healthgate::audit", audit = "mode_set", mode = mode_name(mode), by = %grant.by,
            reason = %grant.reason, ttl = %humantime::format_duration(ttl),
            expires_at = %humantime::format_rfc3339_seconds(grant.expires_at), "control: {} set", mode_name(mode)
        );
        Ok(grant)
    }

    /// Ends drain or maintenance; returns the mode that was active.
    pub fn clear_mode(&self, req: &Request) -> Result<Option<Mode>, ControlError> {
        let by = req.by()?;
        let reason = text("reason", req.reason.as_deref().unwrap_or(""), MAX_REASON_LEN)?;
        let mut o = self.lock();
        let old = o.mode.take();
        self.health.set_mode(Mode::Normal);
        self.publish_counts(&o);
        drop(o);
        if let Some((m, _)) = &old {
            info!(
                target: "healthgate::audit", audit = "mode_cleared", mode = mode_name(*m), by = %by,
                reason = %reason, "control: {} cleared", mode_name(*m)
            );
        }
        Ok(old.map(|(m, _)| m))
    }

    /// Forces dependency `name` up or down for the request's TTL.
    pub fn set_force(&self, name: &str, force: Force, req: &Request) -> Result<Grant, ControlError> {
        let index = self.index(name)?;
        let (by, reason, ttl) = req.validate(self.max_ttl())?;
        let grant = Grant::new(by, reason, ttl, Instant::now());
        let mut o = self.lock();
        o.forces[index] = Some((force, grant.clone()));
        self.health.set_force(index, Some(force));
        self.publish_counts(&o);
        drop(o);
        self.changed.notify_one();
        info!(
            target: "healthgate::audit", audit = "override_set", dependency = %name, force = force_name(force),
            checked = ?self.health.slot(index).map(|d| d.status().state), by = %grant.by, reason = %grant.reason,
            ttl = %humantime::format_duration(ttl), expires_at = %humantime::format_rfc3339_seconds(grant.expires_at),
            "control: dependency forced {}", force_name(force)
        );
        Ok(grant)
    }

    /// Removes dependency `name`'s forced verdict; returns the one that was active.
    pub fn clear_force(&self, name: &str, req: &Request) -> Result<Option<Force>, ControlError> {
        let index = self.index(name)?;
        let by = req.by()?;
        let reason = text("reason", req.reason.as_deref().unwrap_or(""), MAX_REASON_LEN)?;
        let mut o = self.lock();
        let old = o.forces[index].take();
        self.health.set_force(index, None);
        self.publish_counts(&o);
        drop(o);
        if let Some((f, _)) = &old {
            info!(
                target: "healthgate::audit", audit = "override_cleared", dependency = %name, force = force_name(*f),
                by = %by, reason = %reason, "control: dependency override cleared"
            );
        }
        Ok(old.map(|(f, _)| f))
    }

    /// The bit of dependency `name` in the config in force.
    fn index(&self, name: &str) -> Result<usize, ControlError> {
        self.health
            .deps()
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.bit)
            .ok_or_else(|| ControlError::UnknownDependency(name.into()))
    }

    /// The name of the dependency with bit `bit`.
    fn name(&self, bit: usize) -> String {
        self.health.slot(bit).map_or_else(|| format!("#{bit}"), |d| d.name.clone())
    }

    /// Ends every override whose TTL has passed at `now`, with one audit event each.
    pub fn expire(&self, now: Instant) -> usize {
        let mut o = self.lock();
        let expired = o.expire(now);
        for e in &expired {
            match e {
                Expired::Mode(m, g) => {
                    self.health.set_mode(Mode::Normal);
                    info!(
                        target: "healthgate::audit", audit = "mode_expired", mode = mode_name(*m), by = %g.by,
                        reason = %g.reason, ttl = %humantime::format_duration(g.ttl), "control: {} expired", mode_name(*m)
                    );
                }
                Expired::Force(i, f, g) => {
                    self.health.set_force(*i, None);
                    info!(
                        target: "healthgate::audit", audit = "override_expired", dependency = %self.name(*i),
                        force = force_name(*f), by = %g.by, reason = %g.reason, ttl = %humantime::format_duration(g.ttl),
                        "control: dependency override expired"
                    );
                }
            }
        }
        if !expired.is_empty() {
            self.publish_counts(&o);
        }
        expired.len()
    }

    /// Ends overrides at their deadlines, forever (runs on the admin runtime).
    pub async fn run_expiry(self: Arc<Self>) {
        loop {
            let next = self.lock().next_deadline();
            let woken = self.changed.notified();
            match next {
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d)) => {}
                        _ = woken => {}
                    }
                }
                None => woken.await,
            }
            self.expire(Instant::now());
        }
    }

    /// The active overrides as `/status` shows them.
    pub fn to_json(&self) -> serde_json::Value {
        let o = self.lock();
        let mode = o.mode.as_ref().map(|(m, g)| {
            let mut v = g.to_json();
            v["mode"] = json!(mode_name(*m));
            v
        });
        let deps: Vec<_> = o
            .forces
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|f| (i, f)))
            .map(|(i, (f, g))| {
                let mut v = g.to_json();
                v["dependency"] = json!(self.name(i));
                v["force"] = json!(force_name(*f));
                v
            })
            .collect();
        json!({ "mode": mode, "dependencies": deps })
    }
}

// === Authentication ===

/// The result of checking a control request's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    /// The bearer token matches.
    Allowed,
    /// Missing or wrong token (answer 401, no detail).
    Denied,
    /// Too many recent failures: not even checked (answer 429).
    Limited,
}

/// Failures allowed in a burst before the limit applies.
pub const FAILURE_BURST: f64 = 10.0;
/// Failures allowed per second after the burst.
pub const FAILURES_PER_SECOND: f64 = 1.0;

/// A token bucket for authentication failures: guessing costs a second per
/// try once the burst is spent. Decided on explicit `Instant`s.
#[derive(Debug, Clone)]
pub struct FailureLimiter {
    tokens: f64,
    last: Instant,
    /// Requests refused by the limit since the last logged failure.
    pub suppressed: u64,
}

impl FailureLimiter {
    /// A full bucket at `now`.
    pub fn new(now: Instant) -> FailureLimiter {
        FailureLimiter { tokens: FAILURE_BURST, last: now, suppressed: 0 }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * FAILURES_PER_SECOND).min(FAILURE_BURST);
        self.last = self.last.max(now);
    }

    /// Whether a request may be checked at `now` (a refused one is counted as suppressed).
    pub fn allow(&mut self, now: Instant) -> bool {
        self.refill(now);
        let ok = self.tokens >= 1.0;
        if !ok {
            self.suppressed += 1;
        }
        ok
    }

    /// Records a failed check at `now`.
    pub fn failed(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

/// Compares a presented token with the expected one in time that depends
/// only on the expected token's length, never on where they differ.
pub fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = (presented.len() != expected.len()) as u8;
    for (i, e) in expected.iter().enumerate() {
        diff |= presented.get(i).copied().unwrap_or(0) ^ e;
    }
    std::hint::black_box(diff) == 0
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = header.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| token.trim_ascii())
}

/// The identity of a file's current contents, to notice a rotated Secret
/// (Kubernetes swaps a symlink; an editor rewrites in place).
type Stamp = (u64, Option<SystemTime>, u64);

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok(), m.ino()))
}

/// The control API's bearer-token check.
pub struct Auth {
    path: PathBuf,
    cache: Mutex<(Option<Stamp>, Option<Vec<u8>>)>,
    limiter: Mutex<FailureLimiter>,
    metrics: Arc<Metrics>,
}

impl Auth {
    /// The check for `config`'s token file.
    pub fn new(config: &ControlConfig, metrics: Arc<Metrics>) -> Auth {
        Auth {
            path: config.token_file.clone(),
            cache: Mutex::new((None, None)),
            limiter: Mutex::new(FailureLimiter::new(Instant::now())),
            metrics,
        }
    }

    /// The current token, read again when the file changed.
    fn token(&self) -> Option<Vec<u8>> {
        let now = stamp(&self.path);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0.is_none() || cache.0 != now {
            let token = match read_token(&self.path) {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!(error = %e, "control token unusable: every control request is refused");
                    None
                }
            };
            *cache = (now, token);
        }
        cache.1.clone()
    }

    /// Checks an `Authorization` header value; logs and rate-limits failures
    /// (the presented value is never logged).
    pub fn check(&self, authorization: Option<&[u8]>, peer: std::net::SocketAddr, now: Instant) -> AuthResult {
        let mut limiter = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        if !limiter.allow(now) {
            return AuthResult::Limited;
        }
        let presented = authorization.and_then(bearer);
        let ok = match (presented, self.token()) {
            (Some(p), Some(t)) => constant_time_eq(p, &t),
            _ => false,
        };
        if ok {
            return AuthResult::Allowed;
        }
        limiter.failed(now);
        self.metrics.control_auth_failures.inc();
        let suppressed = std::mem::take(&mut limiter.suppressed);
        warn!(
            target: "healthgate::audit", audit = "auth_failed", %peer,
            credentials = if presented.is_some() { "wrong" } else { "missing" },
            suppressed, "control: authentication failed"
        );
        AuthResult::Denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ttl: Option<&str>, reason: Option<&str>) -> Request {
        Request { by: Some("alice".into()), reason: reason.map(Into::into), ttl: ttl.map(Into::into) }
    }

    #[test]
    fn a_ttl_is_mandatory_and_bounded_and_a_reason_is_required() {
        let max = Duration::from_secs(3600);
        assert_eq!(req(None, Some("x")).validate(max), Err(ControlError::TtlMissing));
        assert_eq!(req(Some("soon"), Some("x")).validate(max), Err(ControlError::TtlInvalid("soon".into())));
        assert_eq!(req(Some("2h"), Some("x")).validate(max), Err(ControlError::TtlOutOfRange(max)));
        assert_eq!(req(Some("0s"), Some("x")).validate(max), Err(ControlError::TtlOutOfRange(max)));
        assert_eq!(req(Some("10m"), None).validate(max), Err(ControlError::ReasonMissing));
        assert_eq!(req(Some("10m"), Some("a\nb")).validate(max), Err(ControlError::BadText("reason", 256)));
        assert_eq!(
            req(Some("10m"), Some(" db failover ")).validate(max),
            Ok(("alice".into(), "db failover".into(), Duration::from_secs(600)))
        );
    }

    fn grant(t0: Instant, secs: u64) -> Grant {
        Grant::new("a".into(), "r".into(), Duration::from_secs(secs), t0)
    }

    #[test]
    fn overrides_expire_at_their_deadline_and_not_before() {
        let t0 = Instant::now();
        let mut o =
            Overrides { mode: Some((Mode::Drain, grant(t0, 10))), forces: vec![None, Some((Force::Up, grant(t0, 5)))] };
        assert_eq!(o.next_deadline(), Some(t0 + Duration::from_secs(5)));
        assert!(o.expire(t0 + Duration::from_millis(4999)).is_empty());
        let e = o.expire(t0 + Duration::from_secs(5));
        assert!(matches!(e.as_slice(), [Expired::Force(1, Force::Up, _)]), "{e:?}");
        assert_eq!(o.counts(), [1, 0, 0, 0]);
        assert_eq!(o.next_deadline(), Some(t0 + Duration::from_secs(10)));
        let e = o.expire(t0 + Duration::from_secs(11));
        assert!(matches!(e.as_slice(), [Expired::Mode(Mode::Drain, _)]), "{e:?}");
        assert_eq!(o.next_deadline(), None);
    }

    #[test]
    fn failures_are_limited_after_a_burst_and_refill_over_time() {
        let t0 = Instant::now();
        let mut l = FailureLimiter::new(t0);
        for _ in 0..FAILURE_BURST as usize {
            assert!(l.allow(t0));
            l.failed(t0);
        }
        assert!(!l.allow(t0));
        assert!(!l.allow(t0 + Duration::from_millis(500)));
        assert_eq!(l.suppressed, 2);
        assert!(l.allow(t0 + Duration::from_millis(1001)));
        l.failed(t0 + Duration::from_millis(1001));
        assert!(!l.allow(t0 + Duration::from_millis(1002)));
    }

    #[test]
    fn token_comparison_needs_every_byte_and_the_length() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef0", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"", b"0123456789abcdef"));
    }

    #[test]
    fn only_a_bearer_authorization_carries_a_token() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bear"), None);
    }
}
