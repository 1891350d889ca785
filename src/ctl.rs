//! `healthgate ctl ...`: a client of the admin port's control API, so that an
//! operator can run `kubectl exec <pod> -c healthgate -- healthgate ctl drain
//! --ttl 10m --reason "..."` in the distroless image, which has no shell and
//! no curl.
//!
//! Where it connects and which token it sends: `--admin` / `--token-file`
//! (or `$HEALTHGATE_ADMIN`, `$HEALTHGATE_CONTROL_TOKEN_FILE`,
//! `$HEALTHGATE_CONTROL_TOKEN`), else what the config file says
//! (`admin.listen` on loopback, `admin.control.token_file`), so that inside
//! the pod no option is needed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::config::{Config, ConfigError, TokenError, read_token};

/// Bound on one whole call (connect, request, response).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The environment variable that may carry the token itself.
pub const TOKEN_ENV: &str = "HEALTHGATE_CONTROL_TOKEN";

/// Why a `ctl` command could not run.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The config file was needed (no `--admin` or no token given) and is invalid.
    #[error("{0}\n(pass --admin and --token-file, or fix the config)")]
    Config(#[from] ConfigError),
    /// No token anywhere.
    #[error("no control token: pass --token-file, set {TOKEN_ENV}, or set admin.control.token_file in the config")]
    NoToken,
    /// The token file gives no usable token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The admin port could not be reached.
    #[error("cannot reach the admin server at {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// HTTP failed on the connection.
    #[error("admin server at {addr}: {message}")]
    Http {
        /// The address.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// No answer within [`CALL_TIMEOUT`].
    #[error("admin server at {0}: no answer within 10s")]
    Timeout(String),
}

/// What to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Readiness fails, traffic still proxied.
    Drain {
        /// TTL text (`10m`).
        ttl: String,
        /// Why.
        reason: String,
    },
    /// Readiness fails, requests answered 503.
    Maintenance {
        /// TTL text.
        ttl: String,
        /// Why.
        reason: String,
    },
    /// Ends drain or maintenance.
    Resume {
        /// Why (optional).
        reason: Option<String>,
    },
    /// Forces a dependency's verdict.
    Override {
        /// The dependency.
        dependency: String,
        /// `true` = up.
        up: bool,
        /// TTL text.
        ttl: String,
        /// Why.
        reason: String,
    },
    /// Removes a dependency's override.
    Clear {
        /// The dependency.
        dependency: String,
        /// Why (optional).
        reason: Option<String>,
    },
    /// Reloads the config file (docs/reload.md).
    Reload {
        /// Why (optional).
        reason: Option<String>,
    },
    /// Prints the state, the overrides and each dependency (no token needed).
    Status,
}

/// Where to connect and what to send.
pub struct Target {
    /// `host:port` of the admin server.
    pub admin: String,
    /// The bearer token (not needed for `status`).
    pub token: Option<Vec<u8>>,
}

/// Where the admin server of a config listens, seen from inside the pod.
fn loopback(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port()),
        _ => listen,
    }
}

impl Target {
    /// Resolves the target from the options, the environment and, for what
    /// they leave open, the config file.
    pub fn resolve(
        admin: Option<String>,
        token_file: Option<PathBuf>,
        config: &Path,
        need_token: bool,
    ) -> Result<Target, CtlError> {
        let env_token = std::env::var(TOKEN_ENV).ok().map(|t| t.trim().as_bytes().to_vec()).filter(|t| !t.is_empty());
        let mut token = match (env_token, &token_file) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(read_token(f)?),
            (None, None) => None,
        };
        let needs_config = admin.is_none() || (need_token && token.is_none());
        let config = if needs_config && config.exists() { Some(Config::load(config)?) } else { None };
        if need_token && token.is_none() {
            let file = config.as_ref().and_then(|c| c.admin.control.as_ref()).ok_or(CtlError::NoToken)?;
            token = Some(read_token(&file.token_file)?);
        }
        let admin = admin.unwrap_or_else(|| {
            let listen = config.as_ref().map_or(crate::config::DEFAULT_ADMIN_LISTEN, |c| c.admin.listen);
            loopback(listen).to_string()
        });
        Ok(Target { admin, token })
    }
}

/// Sends one request; returns (status, body).
pub async fn call(target: &Target, method: Method, path: &str, body: Option<Value>) -> Result<(u16, String), CtlError> {
    let addr = target.admin.clone();
    let work = async {
        let http = |message: String| CtlError::Http { addr: addr.clone(), message };
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|source| CtlError::Connect { addr: addr.clone(), source })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| http(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header("host", addr.as_str());
        if let Some(t) = &target.token {
            let mut value = b"Bearer ".to_vec();
            value.extend_from_slice(t);
            req = req.header("authorization", value);
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(body)).map_err(|e| http(e.to_string()))?;
        let res = sender.send_request(req).await.map_err(|e| http(e.to_string()))?;
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.map_err(|e| http(e.to_string()))?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(CALL_TIMEOUT, work).await.map_err(|_| CtlError::Timeout(target.admin.clone()))?
}

/// Runs an action as `by`; returns (success, text to print).
pub async fn execute(target: &Target, action: &Action, by: &str) -> Result<(bool, String), CtlError> {
    let set = |ttl: &str, reason: &str| Some(json!({ "ttl": ttl, "reason": reason, "by": by }));
    let clear = |reason: &Option<String>| Some(json!({ "reason": reason.clone().unwrap_or_default(), "by": by }));
    let (method, path, body) = match action {
        Action::Drain { ttl, reason } => (Method::PUT, "/control/drain".to_string(), set(ttl, reason)),
        Action::Maintenance { ttl, reason } => (Method::PUT, "/control/maintenance".into(), set(ttl, reason)),
        Action::Resume { reason } => (Method::DELETE, "/control/mode".into(), clear(reason)),
        Action::Override { dependency, up, ttl, reason } => (
            Method::PUT,
            format!("/control/dependencies/{}/{}", encode(dependency), if *up { "up" } else { "down" }),
            set(ttl, reason),
        ),
        Action::Clear { dependency, reason } => {
            (Method::DELETE, format!("/control/dependencies/{}", encode(dependency)), clear(reason))
        }
        Action::Reload { reason } => (Method::POST, "/control/reload".into(), clear(reason)),
        Action::Status => {
            let (status, text) = call(target, Method::GET, "/status", None).await?;
            return Ok(match serde_json::from_str::<Value>(&text) {
                Ok(v) if status == 200 => (true, summary(&v)),
                _ => (false, text),
            });
        }
    };
    let (status, text) = call(target, method, &path, body).await?;
    Ok((status == 200, text))
}

/// A dependency name as a path segment (names are `[A-Za-z0-9_.-]`, but
/// anything else must not change the path).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A few lines an operator reads at a glance.
pub fn summary(status: &Value) -> String {
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let mut out = format!(
        "service: {} (ready: {}) since {}\n",
        s(&status["service"]["state"]),
        status["service"]["ready"],
        s(&status["service"]["since"])
    );
    let o = &status["overrides"];
    if !o["mode"].is_null() {
        out.push_str(&format!(
            "override: pod {} by {} until {}: {}\n",
            s(&o["mode"]["mode"]),
            s(&o["mode"]["by"]),
            s(&o["mode"]["expires_at"]),
            s(&o["mode"]["reason"])
        ));
    }
    for d in o["dependencies"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "override: {} forced {} by {} until {}: {}\n",
            s(&d["dependency"]),
            s(&d["force"]),
            s(&d["by"]),
            s(&d["expires_at"]),
            s(&d["reason"])
        ));
    }
    for d in status["dependencies"].as_array().into_iter().flatten() {
        let forced = if d["forced"].is_null() {
            String::new()
        } else {
            format!(" (forced; check says {})", s(&d["checked_state"]))
        };
        let cause = if d["last_ok"] == json!(false) {
            format!(" last failure: {}", s(&d["last_cause"]))
        } else {
            String::new()
        };
        out.push_str(&format!("dependency {}: {}{forced}{cause}\n", s(&d["name"]), s(&d["state"])));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_listen_address_is_reached_on_loopback() {
        assert_eq!(loopback("0.0.0.0:9901".parse().unwrap()), "127.0.0.1:9901".parse().unwrap());
        assert_eq!(loopback("[::]:9901".parse().unwrap()), "[::1]:9901".parse().unwrap());
        assert_eq!(loopback("10.0.0.1:9901".parse().unwrap()), "10.0.0.1:9901".parse().unwrap());
    }

    #[test]
    fn a_dependency_name_cannot_change_the_path() {
        assert_eq!(encode("db-1.main"), "db-1.main");
        assert_eq!(encode("../x y"), "..%2Fx%20y");
    }
}
