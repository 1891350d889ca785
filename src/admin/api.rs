//! The runtime control API on the admin port (only when
//! `admin.control.token_file` is set). Every request carries
//! `Authorization: Bearer <token>`; a missing or wrong one gets 401 with no
//! detail, and after a burst of failures 429 without being checked.
//!
//! | method | path | body (JSON) | effect |
//! |---|---|---|---|
//! | GET | `/control` | | the active overrides |
//! | PUT/POST | `/control/drain` | `ttl`, `reason`, `by` | readiness fails, traffic still proxied |
//! | PUT/POST | `/control/maintenance` | `ttl`, `reason`, `by` | readiness fails, gated requests get 503 |
//! | DELETE | `/control/mode` | `reason`, `by` (optional) | ends drain or maintenance |
//! | PUT/POST | `/control/dependencies/{name}/up` or `/down` | `ttl`, `reason`, `by` | forces the verdict |
//! | DELETE | `/control/dependencies/{name}` | `reason`, `by` (optional) | the check decides again |
//! | POST | `/control/reload` | `reason`, `by` (optional) | reloads the config file (docs/reload.md) |

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::with_type;
use crate::control::{self, Auth, AuthResult, Control, ControlError};
use crate::state::{Force, Mode};

/// Largest request body accepted.
pub const MAX_BODY: usize = 4096;

fn reply(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    body.push(b'\n');
    with_type(status, "application/json", body)
}

fn refused(e: ControlError) -> Response<Full<Bytes>> {
    let status = match e {
        ControlError::UnknownDependency(_) => StatusCode::NOT_FOUND,
        ControlError::Reload(_) => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::BAD_REQUEST,
    };
    reply(status, json!({ "error": e.to_string() }))
}

/// Reads the (small, optional) JSON body.
async fn body(req: Request<Incoming>) -> Result<control::Request, ControlError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| ControlError::BadBody(format!("at most {MAX_BODY} bytes")))?
        .to_bytes();
    if bytes.trim_ascii().is_empty() {
        return Ok(control::Request::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| ControlError::BadBody(e.to_string()))
}

/// Answers a request under `/control`.
pub async fn handle(control: &Control, auth: &Auth, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    match auth.check(req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes), peer, Instant::now()) {
        AuthResult::Allowed => {}
        AuthResult::Denied => {
            let mut r = super::text(StatusCode::UNAUTHORIZED, "unauthorized\n");
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        AuthResult::Limited => {
            let mut r = super::text(StatusCode::TOO_MANY_REQUESTS, "too many failed attempts\n");
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    let set = method == Method::PUT || method == Method::POST;
    let segments: Vec<&str> = path.split('/').skip(2).collect();
    let result = match (segments.as_slice(), &method) {
        ([], &Method::GET) => return reply(StatusCode::OK, control.to_json()),
        (["reload"], &Method::POST) => match body(req).await {
            Ok(b) => control.reload(&b).await,
            Err(e) => Err(e),
        },
        (["drain"], _) if set => set_mode(control, Mode::Drain, req).await,
        (["maintenance"], _) if set => set_mode(control, Mode::Maintenance, req).await,
        (["mode"], &Method::DELETE) => match body(req).await.and_then(|b| control.clear_mode(&b)) {
            Ok(old) => Ok(json!({ "cleared": old })),
            Err(e) => Err(e),
        },
        (["dependencies", name, verdict], _) if set && (*verdict == "up" || *verdict == "down") => {
            let force = if *verdict == "up" { Force::Up } else { Force::Down };
            let name = name.to_string();
            match body(req).await.and_then(|b| control.set_force(&name, force, &b)) {
                Ok(g) => {
                    let mut v = g.to_json();
                    v["dependency"] = json!(name);
                    v["force"] = json!(force);
                    Ok(v)
                }
                Err(e) => Err(e),
            }
        }
        (["dependencies", name], &Method::DELETE) => {
            let name = name.to_string();
            match body(req).await.and_then(|b| control.clear_force(&name, &b)) {
                Ok(old) => Ok(json!({ "dependency": name, "cleared": old })),
                Err(e) => Err(e),
            }
        }
        (
            []
            | ["reload"]
            | ["drain"]
            | ["maintenance"]
            | ["mode"]
            | ["dependencies", _]
            | ["dependencies", _, "up" | "down"],
            _,
        ) => {
            return super::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        _ => return super::text(StatusCode::NOT_FOUND, "not found\n"),
    };
    match result {
        Ok(v) => {
            // Answer once the change shows: an operator whose `ctl drain`
            // returned must already see /readyz fail.
            control.settled().await;
            reply(StatusCode::OK, v)
        }
        Err(e) => refused(e),
    }
}

async fn set_mode(control: &Control, mode: Mode, req: Request<Incoming>) -> Result<serde_json::Value, ControlError> {
    let b = body(req).await?;
    let g = control.set_mode(mode, &b)?;
    let mut v = g.to_json();
    v["mode"] = json!(mode);
    Ok(v)
}
