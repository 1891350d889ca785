//! TLS for the protocol checks, against real servers speaking TLS with a
//! throwaway CA: Redis (`rediss://`, client certificates), MariaDB
//! (`tls: true` for a user that requires SSL), RabbitMQ (`amqps://`), HTTPS (`openssl s_server`)
//! and TCP (a TLS handshake as the check).
//!
//! Run with `cargo test --test tls`; needs `openssl`, `redis-server`, `mariadbd` and `rabbitmq-server`.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use healthgate::check::{AnyCheck, Cause, Check, CheckError};
use healthgate::config::Config;
use tokio::time::Instant;

use support::mariadb::{self, MariaDb};
use support::pki::Pki;
use support::rabbitmq;
use support::redis::Redis;
use support::{STEP, free_port};

/// Per-check timeout used by these tests.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Builds the check of a one-dependency config whose entry is `dep`.
fn check_for(kind: &str, dep: &str) -> AnyCheck {
    let body: String = dep.lines().map(|l| format!("    {l}\n")).collect();
    let yaml = format!(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n\
         dependencies:\n  - name: dep\n    type: {kind}\n{body}"
    );
    let config = Config::from_yaml(&yaml, Path::new("tls-test.yaml")).expect("valid config");
    AnyCheck::new(&config.dependencies[0])
}

/// Runs one check with the test timeout as its deadline.
async fn probe(c: &mut AnyCheck) -> Result<(), CheckError> {
    tokio::time::timeout(STEP, c.check(Instant::now() + TIMEOUT)).await.expect("check overran its deadline")
}

/// Probes every 50 ms until a check passes (a server that is still starting
/// refuses), failing after [`STEP`].
async fn until_ok(c: &mut AnyCheck) {
    let deadline = Instant::now() + STEP;
    loop {
        match probe(c).await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("check still failing after {STEP:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A Redis serving TLS, with the PKI's server certificate.
fn tls_redis(pki: &Pki, client_certs: &str) -> (Redis, u16) {
    let port = free_port();
    let (p, cert, key, ca) = (port.to_string(), pki.path("server.pem"), pki.path("server.key"), pki.path("ca.pem"));
    let redis = Redis::start(&[
        "--tls-port",
        &p,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        client_certs,
    ]);
    (redis, port)
}

#[tokio::test]
async fn rediss_with_the_private_ca_passes() {
    let pki = Pki::generate();
    let (_redis, port) = tls_redis(&pki, "no");
    let mut c = check_for("redis", &format!("address: rediss://localhost:{port}\ntls_ca_file: {}", pki.path("ca.pem")));
    probe(&mut c).await.unwrap();
    // The persistent connection keeps working over TLS.
    probe(&mut c).await.unwrap();
    assert!(c.details().server_version.is_some());
}

#[tokio::test]
async fn certificate_from_an_untrusted_ca_is_cause_tls() {
    let pki = Pki::generate();
    let (_redis, port) = tls_redis(&pki, "no");
    // No tls_ca_file: only the public roots are trusted.
    let mut c = check_for("redis", &format!("address: rediss://localhost:{port}"));
    let err = probe(&mut c).await.unwrap_err();
    assert_eq!(err.cause, Cause::Tls, "{err}");
    assert!(err.message.contains("certificate"), "{err}");
}

#[tokio::test]
async fn certificate_for_another_name_is_cause_tls() {
    let pki = Pki::generate();
    let (_redis, port) = tls_redis(&pki, "no");
    let mut c = check_for(
        "redis",
        &format!(
            "address: rediss://localhost:{port}\ntls_ca_file: {}\ntls_server_name: cache.example.com",
            pki.path("ca.pem")
        ),
    );
    let err = probe(&mut c).await.unwrap_err();
    assert_eq!(err.cause, Cause::Tls, "{err}");
}

/// Redis on a plain port reads the ClientHello as the start of an inline
/// command and waits for its end: the handshake times out, and says so.
#[tokio::test]
async fn plain_redis_behind_a_tls_check_times_out_in_the_handshake() {
    let redis = Redis::start(&[]);
    let pki = Pki::generate();
    let mut c = check_for(
        "redis",
        &format!("address: rediss://localhost:{}\ntls_ca_file: {}", redis.port(), pki.path("ca.pem")),
    );
    let err = probe(&mut c).await.unwrap_err();
    assert_eq!(err.cause, Cause::ReadTimeout, "{err}");
    assert!(err.message.contains("TLS handshake"), "{err}");
}

#[tokio::test]
async fn server_requiring_a_client_certificate_accepts_ours_and_refuses_none() {
    let pki = Pki::generate();
    let (_redis, port) = tls_redis(&pki, "yes");
    let base = format!("address: rediss://localhost:{port}\ntls_ca_file: {}", pki.path("ca.pem"));
    let mut with_cert = check_for(
        "redis",
        &format!("{base}\ntls_cert_file: {}\ntls_key_file: {}", pki.path("client.pem"), pki.path("client.key")),
    );
    probe(&mut with_cert).await.unwrap();
    // TLS 1.3 reports a missing client certificate after the handshake, on
    // the first read: still a TLS failure, not a reset.
    let mut without = check_for("redis", &base);
    let err = probe(&mut without).await.unwrap_err();
    assert_eq!(err.cause, Cause::Tls, "{err}");
}

#[tokio::test]
async fn mysql_tls_true_logs_in_as_a_user_that_requires_ssl() {
    let pki = Pki::generate();
    let db = MariaDb::start_with(&[
        format!("--ssl-ca={}", pki.path("ca.pem")),
        format!("--ssl-cert={}", pki.path("server.pem")),
        format!("--ssl-key={}", pki.path("server.key")),
    ])
    .await;
    db.exec(&format!("ALTER USER '{}'@'%' REQUIRE SSL", mariadb::USER)).await;
    let (_dir, pw) = password_file(mariadb::PASSWORD);
    let base = format!("address: localhost:{}\nuser: {}\npassword_file: {pw}", db.port(), mariadb::USER);
    // Without TLS the server refuses this user: proof that the check below really used TLS.
    let mut plain = check_for("mysql", &base);
    let err = probe(&mut plain).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
    let mut tls = check_for("mysql", &format!("{base}\ntls: true\ntls_ca_file: {}", pki.path("ca.pem")));
    probe(&mut tls).await.unwrap();
    let mut untrusted = check_for("mysql", &format!("{base}\ntls: true"));
    let err = probe(&mut untrusted).await.unwrap_err();
    assert_eq!(err.cause, Cause::Tls, "{err}");
}

#[tokio::test]
async fn amqps_opens_a_channel_over_tls() {
    let node = rabbitmq::node();
    let _guard = rabbitmq::shared().await;
    let pki = node.pki();
    let pw = node.dir().join("tls-test-password");
    std::fs::write(&pw, rabbitmq::PASSWORD).unwrap();
    let base = format!("url: amqps://{}@localhost:{}/\npassword_file: {}", rabbitmq::USER, node.tls_port, pw.display());
    let mut c = check_for("amqp", &format!("{base}\ntls_ca_file: {}", pki.path("ca.pem")));
    probe(&mut c).await.unwrap();
    probe(&mut c).await.unwrap();
    let mut untrusted = check_for("amqp", &base);
    let err = probe(&mut untrusted).await.unwrap_err();
    assert_eq!(err.cause, Cause::Tls, "{err}");
}

/// `openssl s_server -www`: answers every HTTPS request with 200 and a status page.
struct SServer(Child, u16);

impl SServer {
    fn start(pki: &Pki) -> SServer {
        let port = free_port();
        let child = Command::new("openssl")
            .args(["s_server", "-www", "-quiet", "-accept", &port.to_string()])
            .args(["-cert", &pki.path("server.pem"), "-key", &pki.path("server.key")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start openssl s_server");
        SServer(child, port)
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn https_check_passes_against_a_tls_server() {
    let pki = Pki::generate();
    let server = SServer::start(&pki);
    let mut c = check_for(
        "http",
        &format!("url: https://localhost:{}/\nexpect_status: [200]\ntls_ca_file: {}", server.1, pki.path("ca.pem")),
    );
    until_ok(&mut c).await;
}

#[tokio::test]
async fn tcp_check_with_tls_needs_a_verified_handshake() {
    let pki = Pki::generate();
    let server = SServer::start(&pki);
    let addr = format!("address: localhost:{}\ntls: true", server.1);
    let mut trusted = check_for("tcp", &format!("{addr}\ntls_ca_file: {}", pki.path("ca.pem")));
    until_ok(&mut trusted).await;
    let mut untrusted = check_for("tcp", &addr);
    let err = probe(&mut untrusted).await.unwrap_err();
    assert_eq!(err.cause, Cause::Tls, "{err}");
}

#[test]
fn unreadable_ca_file_is_a_config_error_at_its_key() {
    let yaml = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n\
                dependencies:\n  - name: dep\n    type: redis\n    address: rediss://cache\n    \
                tls_ca_file: /nonexistent/ca.pem\n";
    let err = Config::from_yaml(yaml, Path::new("tls.yaml")).unwrap_err().to_string();
    assert!(err.contains("tls.yaml:9:18: dependencies[0].tls_ca_file"), "{err}");
}

/// A password file in a temp dir.
fn password_file(pw: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("password");
    std::fs::write(&path, pw).unwrap();
    let p = path.to_str().unwrap().to_string();
    (dir, p)
}
