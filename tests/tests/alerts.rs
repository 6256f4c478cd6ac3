//! The alert webhook: a transaction becoming STUCK and a branch reaching
//! the failed-attempt threshold are POSTed to a real HTTP receiver, with
//! retries; a webhook that never answers slows no transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tandem_coordinator::alerts::AlertSettings;
use tandem_coordinator::config::RetryPolicy;
use tandem_coordinator::log::MemLog;
use tandem_coordinator::model::TxState;
use tandem_coordinator::runtime::Environment;
use tandem_coordinator::security::ServerSecurity;
use tandem_coordinator::{CoordinatorConfig, RunningCoordinator};
use tandem_sdk::TransactionClient;
use tandem_tests::{Scripted, eventually, pair, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// How the receiver answers.
#[derive(Clone, Copy)]
enum Answer {
    /// 500 to the first `n` POSTs, 204 after.
    FailFirst(usize),
    /// Reads the request and never answers.
    Never,
}

/// One POST the receiver got: its headers (lower case) and JSON body.
struct Received {
    headers: String,
    body: serde_json::Value,
}

/// An HTTP receiver on 127.0.0.1:0; returns its URL, the POSTs it got and
/// how many connections it accepted.
async fn receiver(answer: Answer) -> (String, mpsc::UnboundedReceiver<Received>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!(
        "http://{}/hooks/tandem",
        listener.local_addr().expect("addr")
    );
    let (tx, rx) = mpsc::unbounded_channel();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let n = count.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let Ok(read) = conn.read(&mut chunk).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..read]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let head = head.to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if body.len() >= len {
                            break (head, body[..len].to_string());
                        }
                    }
                };
                assert!(head.starts_with("post /hooks/tandem http/1.1"), "{head}");
                let body = serde_json::from_str(&body).expect("JSON alert");
                let _ = tx.send(Received {
                    headers: head,
                    body,
                });
                let status = match answer {
                    Answer::Never => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                    Answer::FailFirst(k) if n < k => "500 Internal Server Error",
                    Answer::FailFirst(_) => "204 No Content",
                };
                let reply =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    (url, rx, accepted)
}

fn settings(url: &str, after_attempts: u32) -> AlertSettings {
    let mut s = AlertSettings::new(url, "coord-test");
    s.after_attempts = after_attempts;
    s.first_backoff = Duration::from_millis(50);
    s.request_timeout = Duration::from_millis(500);
    s
}

/// A coordinator giving up on a branch after two failed phase-2 calls.
async fn coordinator(alerts: AlertSettings) -> RunningCoordinator {
    let config = CoordinatorConfig {
        retry: RetryPolicy {
            max_attempts: Some(2),
            ..test_config().retry
        },
        ..test_config()
    };
    let env = Environment {
        alerts: Some(alerts),
        ..Environment::default()
    };
    RunningCoordinator::start_with(
        config,
        Arc::new(MemLog::new()),
        env,
        ServerSecurity::default(),
    )
    .await
    .expect("start")
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an alert within 10 s")
        .expect("receiver running")
}

// A participant whose commit keeps failing: one "branch_failing" alert
// when its failures reach the threshold, one "stuck" alert when the retry
// policy gives up; each with the gtid, decision, resource and last error.
#[tokio::test]
async fn stuck_and_failing_branch_are_reported() {
    let (url, mut rx, _) = receiver(Answer::FailFirst(0)).await;
    let mut alerts = settings(&url, 2);
    alerts.token = Some("hook-secret".into());
    let coord = coordinator(alerts).await;
    let (ok, down) = (Scripted::yes("ok"), Scripted::phase_two_down("down"));
    let (p_ok, p_down) = (ok.serve().await, down.serve().await);
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let done = client
        .submit(tandem_sdk::Mode::TwoPhase, pair(&p_ok, &p_down))
        .await
        .expect("submit");
    let gtid = done.gtid.to_string();

    let mut got = [next(&mut rx).await, next(&mut rx).await];
    got.sort_by_key(|r| r.body["kind"].as_str().map(str::to_string));
    let (failing, stuck) = (&got[0].body, &got[1].body);
    assert_eq!(failing["kind"], "branch_failing", "{failing}");
    assert_eq!(stuck["kind"], "stuck", "{stuck}");
    for alert in [failing, stuck] {
        assert_eq!(alert["gtid"], gtid.as_str(), "{alert}");
        assert_eq!(alert["decision"], "commit", "{alert}");
        assert_eq!(alert["resource"], "r", "{alert}");
        assert_eq!(alert["branch_id"], 2, "{alert}");
        assert_eq!(alert["attempts"], 2, "{alert}");
        assert_eq!(alert["instance"], "coord-test", "{alert}");
        assert!(alert["at_ms"].as_u64().is_some_and(|t| t > 0), "{alert}");
        assert!(
            alert["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("down for maintenance")),
            "{alert}"
        );
    }
    assert_eq!(stuck["state"], "stuck", "{stuck}");
    assert_eq!(failing["state"], "committing", "{failing}");
    assert!(
        got[0].headers.contains("authorization: bearer hook-secret"),
        "{}",
        got[0].headers
    );
    assert!(got[0].headers.contains("content-type: application/json"));
    // Once each.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "one alert of each kind");
    coord.shutdown().await.expect("shutdown");
}

// A receiver failing the first two POSTs with 500 still gets the alert.
#[tokio::test]
async fn failed_deliveries_are_retried() {
    let (url, mut rx, _) = receiver(Answer::FailFirst(2)).await;
    let coord = coordinator(settings(&url, 100)).await;
    let (ok, down) = (Scripted::yes("ok"), Scripted::phase_two_down("down"));
    let (p_ok, p_down) = (ok.serve().await, down.serve().await);
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let done = client
        .submit(tandem_sdk::Mode::TwoPhase, pair(&p_ok, &p_down))
        .await
        .expect("submit");
    let posts = [
        next(&mut rx).await,
        next(&mut rx).await,
        next(&mut rx).await,
    ];
    for p in &posts {
        assert_eq!(p.body["kind"], "stuck", "{}", p.body);
        assert_eq!(p.body["gtid"], done.gtid.to_string().as_str());
    }
    // The third was answered 204: nothing more is sent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Ok(extra) = rx.try_recv() {
        panic!("delivered once answered 2xx; then {}", extra.body);
    }
    coord.shutdown().await.expect("shutdown");
}

// A webhook that never answers slows no transaction: commits of other
// transactions finish as fast as without alerts, and shutdown is not held.
#[tokio::test]
async fn a_silent_webhook_blocks_nothing() {
    let (url, mut rx, accepted) = receiver(Answer::Never).await;
    let mut alerts = settings(&url, 1);
    alerts.request_timeout = Duration::from_secs(60);
    let coord = coordinator(alerts).await;
    let (ok, down) = (Scripted::yes("ok"), Scripted::phase_two_down("down"));
    let (p_ok, p_down) = (ok.serve().await, down.serve().await);
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    // Several transactions get STUCK: their alerts queue behind a POST
    // that never ends.
    for _ in 0..5 {
        client
            .submit(tandem_sdk::Mode::TwoPhase, pair(&p_ok, &p_down))
            .await
            .expect("submit");
    }
    next(&mut rx).await;
    eventually("the transactions STUCK", || {
        coord
            .coordinator
            .list_page(
                None,
                &tandem_coordinator::runtime::ListQuery {
                    states: vec![TxState::Stuck],
                    ..Default::default()
                },
                100,
            )
            .map(|l| l.records.len() == 5)
            .unwrap_or(false)
    })
    .await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one delivery at a time");
    let p_ok2 = Scripted::yes("ok2").serve().await;
    let start = Instant::now();
    for _ in 0..50 {
        let done = client
            .submit(tandem_sdk::Mode::TwoPhase, pair(&p_ok, &p_ok2))
            .await
            .expect("committed");
        assert!(done.complete, "committed everywhere");
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "50 commits took {took:?}");
    let start = Instant::now();
    coord.shutdown().await.expect("shutdown");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "shutdown held by the webhook"
    );
}

// A saga whose compensation can never succeed, and a message whose
// back-check cannot be reached: each ends STUCK with a "stuck" alert
// naming its mode, decision and failing branch (never a silent log line).
#[tokio::test]
async fn a_stuck_saga_and_a_stuck_message_are_reported() {
    let (url, mut rx, _) = receiver(Answer::FailFirst(0)).await;
    let coord = coordinator(settings(&url, 100)).await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");

    // Saga: step 2 says no, step 1's compensation is refused for good.
    let stuck_step = Scripted::new(
        "s1",
        tandem_tests::Script {
            phase_two_never: Some("refund desk closed".into()),
            ..tandem_tests::Script::default()
        },
        None,
    );
    let refusing = Scripted::new(
        "s2",
        tandem_tests::Script {
            vote_no: Some("sold out".into()),
            ..tandem_tests::Script::default()
        },
        None,
    );
    let (p1, p2) = (stuck_step.serve_saga().await, refusing.serve_saga().await);
    // Aborted (step 2's no), reported as ABORTING: STUCK.
    let _ = client.submit(tandem_sdk::Mode::Saga, pair(&p1, &p2)).await;
    let alert = next(&mut rx).await.body;
    assert_eq!(alert["kind"], "stuck", "{alert}");
    assert_eq!(alert["mode"], "saga", "{alert}");
    assert_eq!(alert["decision"], "abort", "{alert}");
    assert_eq!(alert["branch_id"], 1, "{alert}");
    assert!(
        alert["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refund desk closed")),
        "{alert}"
    );

    // Message: its back-check is down; STUCK undecided after the policy.
    let inbox = Scripted::yes("inbox");
    let p_inbox = inbox.serve().await;
    let gtid = tandem_sdk::Gtid::now_v7();
    client
        .prepare_message(
            gtid,
            tandem_sdk::Branch::new(
                format!("http://{}", tandem_tests::process::free_addr()),
                "orders",
                "",
            ),
            vec![tandem_sdk::Branch::new(p_inbox.url(), "inbox", "sms")],
            Some(Duration::from_millis(100)),
        )
        .await
        .expect("prepare");
    let alert = next(&mut rx).await.body;
    assert_eq!(alert["kind"], "stuck", "{alert}");
    assert_eq!(alert["gtid"], gtid.to_string().as_str(), "{alert}");
    assert_eq!(alert["mode"], "msg", "{alert}");
    assert_eq!(alert["decision"], "none", "{alert}");
    assert_eq!(alert["branch_id"], 1, "{alert}");
    coord.shutdown().await.expect("shutdown");
}
