//! The operations surface under hostile input, against a live `tandem
//! serve`: label injection into /metrics, idle connections on the admin
//! listener, health under the request limit, cross-site actions.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tandem_sdk::{Branch, Mode, TransactionClient};
use tandem_tests::access::Access;
use tandem_tests::process::Serve;
use tandem_tests::webdriver::http;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A resource name is a client-chosen string (any bytes up to 256) and
/// becomes a Prometheus label value; prometheus-client 0.24 does not escape
/// label values, so a quote or a newline in it breaks the exposition and
/// lets a client write samples of its own into /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_name_cannot_inject_samples_into_metrics() {
    let dir = tempfile::tempdir().expect("dir");
    let (serve, admin) = Serve::start_with_admin(&dir.path().join("data"), &[], &[]);
    let client = TransactionClient::connect(serve.url.clone())
        .await
        .expect("connect");
    // Nothing listens there: the call fails, and is counted under the
    // resource name.
    let dead = format!("http://{}", tandem_tests::process::free_addr());
    let evil = "x\",phase=\"prepare\",result=\"yes\"} 1\ntandem_transactions_finished_total{mode=\"2pc\",outcome=\"committed\"} 1000000\n# x{a=\"";
    let _ = client
        .submit(Mode::TwoPhase, vec![Branch::new(&dead, evil, "p")])
        .await;
    let reply = http("GET", &admin, "/metrics", &[], None);
    assert_eq!(reply.status, 200, "{}", reply.body);
    for line in reply.body.lines() {
        assert!(
            !line.starts_with(
                "tandem_transactions_finished_total{mode=\"2pc\",outcome=\"committed\"} 1000000"
            ),
            "a client wrote its own sample into /metrics:\n{}",
            reply.body
        );
    }
    // Every sample line has balanced quotes in its labels.
    for line in reply.body.lines().filter(|l| !l.starts_with('#')) {
        let quotes = line.matches('"').count() - line.matches("\\\"").count();
        assert_eq!(quotes % 2, 0, "broken sample line {line:?}");
    }
}

/// The admin listener keeps at most 256 connections and closes new ones
/// past that; with no idle / header-read timeout, 256 silent TCP
/// connections (no credential needed) lock operators and Prometheus out.
#[test]
fn idle_connections_do_not_lock_the_admin_listener_out() {
    let dir = tempfile::tempdir().expect("dir");
    let (_serve, admin) = Serve::start_with_admin(&dir.path().join("data"), &[], &[]);
    let mut idle = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = TcpStream::connect(&admin) {
            idle.push(s);
        }
    }
    // Give the listener time to accept them all, and any sane header-read
    // timeout time to fire (hyper's default is 30 s once a timer is set).
    std::thread::sleep(Duration::from_secs(40));
    let mut s = TcpStream::connect(&admin).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /api/overview HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let n = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "locked out by {} idle connections: {n:?} {text:?}",
        idle.len()
    );
}

/// The health service sits behind --max-concurrent-requests: a coordinator
/// busy with slow Submits answers its load balancer's / kubelet's health
/// probe RESOURCE_EXHAUSTED, and gets restarted exactly when busiest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_while_requests_are_at_their_limit() {
    let dir = tempfile::tempdir().expect("dir");
    let serve = Serve::start_with(
        &dir.path().join("data"),
        &["--max-concurrent-requests", "4", "--call-timeout", "20s"],
        &[],
    );
    // A participant that accepts TCP and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hole_url = format!("http://{}", hole.local_addr().expect("addr"));
    let mut busy = Vec::new();
    for _ in 0..4 {
        let url = serve.url.clone();
        let hole_url = hole_url.clone();
        busy.push(tokio::spawn(async move {
            let client = TransactionClient::connect(url).await.expect("connect");
            let _ = client
                .submit(Mode::TwoPhase, vec![Branch::new(&hole_url, "r", "p")])
                .await;
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let channel = tonic::transport::Channel::from_shared(serve.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let got = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    match got {
        Ok(r) => assert_eq!(r.into_inner().status(), ServingStatus::Serving),
        Err(s) => panic!("health probe refused while busy: {s:?}"),
    }
    for b in busy {
        b.abort();
    }
}

/// A browser holding an admin credential (a client certificate is sent
/// with any page's form) must not act for another site: an action with a
/// foreign `Origin` or `Sec-Fetch-Site: cross-site` is refused and changes
/// nothing; the console's own origin and plain tools are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_from_another_site_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let access = Access::write(dir.path());
    let admin_token = access.admin.clone();
    let (serve, admin) = Serve::start_with_admin(
        &dir.path().join("data"),
        &["--auth-file", &access.path.to_string_lossy()],
        &[],
    );
    let options = access.client_options();
    let client = TransactionClient::connect_with(serve.url.clone(), &options)
        .await
        .expect("connect");
    let gtid = client
        .begin(Mode::TwoPhase)
        .await
        .expect("begin")
        .to_string();
    let auth = format!("Bearer {admin_token}");
    let path = format!("/api/transactions/{gtid}/abort");
    let state = || {
        http(
            "GET",
            &admin,
            &format!("/api/transactions/{gtid}"),
            &[("Authorization", auth.as_str())],
            None,
        )
        .json()["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // A browser says where a request comes from; a form cannot send
    // Authorization (a client certificate goes with it unasked).
    for (with_token, hostile) in [
        (
            true,
            [
                ("Origin", "https://evil.example"),
                ("Sec-Fetch-Site", "cross-site"),
            ],
        ),
        (true, [("Sec-Fetch-Site", "same-site"), ("X-Nothing", "1")]),
        (
            false,
            [("Origin", "https://evil.example"), ("X-Nothing", "1")],
        ),
        (false, [("Origin", "null"), ("X-Nothing", "1")]),
    ] {
        let mut headers = Vec::new();
        if with_token {
            headers.push(("Authorization", auth.as_str()));
        }
        headers.extend(hostile);
        let refused = http("POST", &admin, &path, &headers, None);
        assert_eq!(refused.status, 403, "{hostile:?}: {}", refused.body);
        assert!(refused.body.contains("own origin"), "{}", refused.body);
        assert_eq!(
            state(),
            "ACTIVE",
            "a cross-site action changed the transaction"
        );
    }
    // The console's own origin acts.
    let origin = format!("http://{admin}");
    let done = http(
        "POST",
        &admin,
        &path,
        &[
            ("Authorization", auth.as_str()),
            ("Origin", origin.as_str()),
            ("Sec-Fetch-Site", "same-origin"),
        ],
        None,
    );
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(state(), "ABORTED");
}
