//! Finding the peers and asking one for its view: DNS (every A/AAAA record
//! of a headless Service), a static list or a file, and a plain HTTP/1.1
//! GET of `/fleet/view` on a peer's admin port, bounded in time and bytes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::view::View;
use crate::config::fleet::parse_peer_file;
use crate::config::{HostPort, PeerSource};

/// The path of the view on every instance's admin port.
pub const VIEW_PATH: &str = "/fleet/view";
/// Largest view accepted: a view lists dependency names and verdicts only.
pub const MAX_VIEW_BYTES: usize = 64 * 1024;
/// Bound on one resolution of the peer list (a resolver that does not
/// answer keeps the last list; the system resolver's own retries can last
/// longer than this).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the peers could not be found or a peer did not give its view.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The name or an entry did not resolve.
    #[error("cannot resolve {what}: {source}")]
    Resolve {
        /// The name.
        what: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The resolver did not answer within [`RESOLVE_TIMEOUT`].
    #[error("peer list not resolved within {0:?}")]
    ResolveTimeout(Duration),
    /// The peer file could not be read.
    #[error("cannot read peer file: {0}")]
    File(std::io::Error),
    /// The call did not finish within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The TCP connect failed.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// HTTP failed (handshake, request, body).
    #[error("http: {0}")]
    Http(String),
    /// The peer answered with another status (not an instance with a fleet view).
    #[error("status {0}")]
    Status(u16),
    /// The body is not a view.
    #[error("not a view: {0}")]
    Json(String),
}

impl PeerError {
    /// The bounded label of `fleet_peer_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            PeerError::Timeout(_) => "timeout",
            PeerError::Connect(_) => "refused",
            PeerError::Status(_) | PeerError::Json(_) => "bad_view",
            PeerError::Http(_) | PeerError::Resolve { .. } | PeerError::ResolveTimeout(_) | PeerError::File(_) => {
                "error"
            }
        }
    }
}

/// Resolves the peer list to addresses (sorted, without duplicates);
/// `problems` receives the entries that were skipped, for one log event.
pub async fn resolve(source: &PeerSource, problems: &mut Vec<String>) -> Result<Vec<SocketAddr>, PeerError> {
    tokio::time::timeout(RESOLVE_TIMEOUT, resolve_now(source, problems))
        .await
        .map_err(|_| PeerError::ResolveTimeout(RESOLVE_TIMEOUT))?
}

async fn resolve_now(source: &PeerSource, problems: &mut Vec<String>) -> Result<Vec<SocketAddr>, PeerError> {
    let mut out = BTreeSet::new();
    match source {
        PeerSource::Dns { name, port } => {
            let addrs = tokio::net::lookup_host((name.as_str(), *port))
                .await
                .map_err(|source| PeerError::Resolve { what: name.clone(), source })?;
            out.extend(addrs);
        }
        PeerSource::Static(list) => resolve_all(list, &mut out, problems).await,
        PeerSource::File { path, port } => {
            let text = tokio::fs::read_to_string(path).await.map_err(PeerError::File)?;
            let (list, bad) = parse_peer_file(&text, *port);
            problems.extend(bad);
            resolve_all(&list, &mut out, problems).await;
        }
    }
    Ok(out.into_iter().collect())
}

/// Resolves every entry; one that fails is skipped (and named), not fatal.
async fn resolve_all(list: &[HostPort], out: &mut BTreeSet<SocketAddr>, problems: &mut Vec<String>) {
    for h in list {
        match tokio::net::lookup_host((h.host.as_str(), h.port)).await {
            Ok(addrs) => out.extend(addrs),
            Err(e) => problems.push(format!("{h}: {e}")),
        }
    }
}

/// GETs a peer's view within `timeout` (connect, request and whole body).
pub async fn fetch_view(addr: SocketAddr, timeout: Duration) -> Result<View, PeerError> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(PeerError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| PeerError::Http(e.to_string()))?;
        // The connection task ends with the call (its socket is dropped with
        // the sender and the timeout cancels both).
        let driver = tokio::spawn(conn);
        let req = Request::get(VIEW_PATH)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| PeerError::Http(e.to_string()))?;
        let res = sender.send_request(req).await.map_err(|e| PeerError::Http(e.to_string()));
        let res = match res {
            Ok(r) => r,
            Err(e) => {
                driver.abort();
                return Err(e);
            }
        };
        if res.status() != StatusCode::OK {
            driver.abort();
            return Err(PeerError::Status(res.status().as_u16()));
        }
        let body = Limited::new(res.into_body(), MAX_VIEW_BYTES).collect().await;
        driver.abort();
        let body = body.map_err(|e| PeerError::Http(e.to_string()))?.to_bytes();
        serde_json::from_slice::<View>(&body).map_err(|e| PeerError::Json(e.to_string()))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| PeerError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot server answering every connection with `reply` (after `delay`).
    async fn server(reply: &'static [u8], delay: Duration) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(reply).await;
                });
            }
        });
        addr
    }

    const T: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_view_is_read_from_a_peer() {
        let body =
            br#"{"instance":"pod-b","dependencies":[{"name":"db","state":"down","since":"2026-01-01T00:00:00Z"}]}"#;
        let reply: &'static [u8] = Box::leak(
            [format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes(), body].concat().into(),
        );
        let v = tokio::time::timeout(Duration::from_secs(5), fetch_view(server(reply, Duration::ZERO).await, T))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v.instance, "pod-b");
        assert_eq!(v.dependencies[0].state, super::super::policy::PeerState::Down);
    }

    #[tokio::test]
    async fn a_slow_peer_times_out_and_a_dead_one_is_refused() {
        let slow = server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", Duration::from_secs(30)).await;
        let started = std::time::Instant::now();
        let e = fetch_view(slow, T).await.unwrap_err();
        assert!(matches!(e, PeerError::Timeout(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert_eq!(fetch_view(dead, T).await.unwrap_err().outcome(), "refused");
    }

    #[tokio::test]
    async fn garbage_an_error_status_and_a_huge_body_are_not_views() {
        let garbage = server(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", Duration::ZERO).await;
        assert_eq!(fetch_view(garbage, T).await.unwrap_err().outcome(), "bad_view");
        let missing = server(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", Duration::ZERO).await;
        assert!(matches!(fetch_view(missing, T).await.unwrap_err(), PeerError::Status(404)));
        let huge = server(b"HTTP/1.1 200 OK\r\ncontent-length: 99999999\r\n\r\n{", Duration::ZERO).await;
        assert!(fetch_view(huge, T).await.is_err());
    }

    #[tokio::test]
    async fn a_dns_name_gives_every_address_at_the_port() {
        let dns = PeerSource::Dns { name: "localhost".into(), port: 9901 };
        let addrs = resolve(&dns, &mut Vec::new()).await.unwrap();
        assert!(addrs.contains(&"127.0.0.1:9901".parse().unwrap()), "{addrs:?}");
        assert!(addrs.iter().all(|a| a.port() == 9901), "{addrs:?}");
        let missing = PeerSource::Dns { name: "no-such-host.invalid".into(), port: 1 };
        assert!(matches!(resolve(&missing, &mut Vec::new()).await, Err(PeerError::Resolve { .. })));
    }

    #[tokio::test]
    async fn a_static_list_resolves_every_entry_and_skips_the_bad_ones() {
        let list = PeerSource::Static(vec![
            HostPort { host: "127.0.0.1".into(), port: 9001 },
            HostPort { host: "127.0.0.1".into(), port: 9001 },
            HostPort { host: "no-such-host.invalid".into(), port: 1 },
        ]);
        let mut problems = Vec::new();
        let addrs = resolve(&list, &mut problems).await.unwrap();
        assert_eq!(addrs, vec!["127.0.0.1:9001".parse().unwrap()]);
        assert_eq!(problems.len(), 1, "{problems:?}");
    }
}
