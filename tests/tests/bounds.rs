//! Nothing grows without bound at the gRPC boundary: participant channels,
//! requests in flight, text echoed in statuses and stored in records.

use std::sync::Arc;
use std::time::Duration;

use tandem_coordinator::RunningCoordinator;
use tandem_coordinator::log::MemLog;
use tandem_proto::v1 as pb;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_sdk::{Branch, Error, Mode, TransactionClient};
use tandem_tests::{Script, Scripted, start_coordinator, test_config};

async fn raw_client(url: String) -> CoordinatorClient<tonic::transport::Channel> {
    CoordinatorClient::connect(url).await.expect("connect")
}

// Rule: an endpoint with a path is refused before anything is dialled
// (500 paths once took the process from 16 to 1016 open files), and
// spellings of one address share one channel.
#[tokio::test]
async fn endpoint_paths_are_refused_and_spellings_share_one_channel() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let p = Scripted::yes("p").serve().await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    for i in 0..500 {
        let endpoint = format!("{}/u{i}", p.url());
        let err = client
            .submit(Mode::TwoPhase, vec![Branch::new(endpoint, "r", "x")])
            .await
            .expect_err("a path is refused");
        assert!(err.to_string().contains("path"), "{err}");
    }
    assert_eq!(coord.coordinator.participant_channels(), 0);
    let shouted = p.url().replace("http://", "HTTP://");
    for endpoint in [p.url(), shouted, format!("{}/", p.url())] {
        client
            .submit(Mode::TwoPhase, vec![Branch::new(endpoint, "r", "x")])
            .await
            .expect("submit");
    }
    assert_eq!(coord.coordinator.participant_channels(), 1);
}

// Rule: a malformed gtid of 100 KB is INVALID_ARGUMENT with a short
// message (a status is an HTTP/2 header; grpcio rejects large ones).
#[tokio::test]
async fn a_huge_malformed_gtid_gets_a_short_invalid_argument() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let mut rpc = raw_client(coord.url()).await;
    let status = rpc
        .commit(pb::CommitRequest {
            gtid: "z".repeat(100_000),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().len() <= 1024,
        "{} bytes",
        status.message().len()
    );
}

// Rule: a participant's 20 KB vote-no reason is stored and reported cut to
// 4 KiB, and the ABORTED status of Enlist carries at most 1 KiB.
#[tokio::test]
async fn a_long_vote_no_reason_is_capped() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let script = Script {
        vote_no: Some("n".repeat(20_000)),
        ..Script::default()
    };
    let p = Scripted::new("no", script, None).serve().await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let Err(Error::Aborted {
        gtid: Some(gtid),
        reason,
        ..
    }) = client
        .submit(Mode::TwoPhase, vec![Branch::new(p.url(), "r", "x")])
        .await
    else {
        panic!("expected an abort");
    };
    assert!(
        reason.len() <= 4096 + 100,
        "reason of {} bytes",
        reason.len()
    );
    let info = client.get(gtid).await.expect("get");
    assert!(info.branches[0].last_error.len() <= 4096);
    assert!(info.reason.len() <= 4096 + 100);

    let mut rpc = raw_client(coord.url()).await;
    let gtid = client.begin(Mode::TwoPhase).await.expect("begin");
    let status = rpc
        .enlist(pb::EnlistRequest {
            gtid: gtid.to_string(),
            branch: Some(pb::BranchSpec {
                endpoint: p.url(),
                resource: "r".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Aborted);
    assert!(
        status.message().len() <= 1024,
        "{} bytes",
        status.message().len()
    );
}

// Rule: past `max_concurrent_requests`, a request is answered
// RESOURCE_EXHAUSTED at once rather than queued; the ones admitted finish.
#[tokio::test]
async fn requests_past_the_limit_are_refused_at_once() {
    let config = tandem_coordinator::CoordinatorConfig {
        max_concurrent_requests: 4,
        call_timeout: Duration::from_secs(5),
        ..test_config()
    };
    let coord = RunningCoordinator::start(config, Arc::new(MemLog::new()))
        .await
        .expect("start");
    let script = Script {
        prepare_delay: Duration::from_millis(500),
        ..Script::default()
    };
    let slow = Scripted::new("slow", script, None);
    let p = slow.serve().await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let (client, url) = (client.clone(), p.url());
            tokio::spawn(async move {
                let r = client
                    .submit(Mode::TwoPhase, vec![Branch::new(url, "r", "x")])
                    .await;
                (r, started.elapsed())
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for c in calls {
        match c.await.expect("join") {
            (Ok(_), _) => ok += 1,
            (Err(Error::Rpc(s)), took) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(took < Duration::from_millis(400), "refusal waited {took:?}");
                refused += 1;
            }
            (other, _) => panic!("unexpected {other:?}"),
        }
    }
    assert!(ok >= 4 && refused >= 10, "ok {ok}, refused {refused}");
    assert_eq!(ok, slow.prepares.load(std::sync::atomic::Ordering::SeqCst));
}
