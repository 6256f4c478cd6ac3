//! Bad input gets a clear status and changes nothing in the log.

use std::sync::Arc;

use tandem_coordinator::RunningCoordinator;
use tandem_coordinator::log::{MemLog, TxnLog};
use tandem_proto::v1 as pb;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_sdk::{Branch, Error, Mode, TransactionClient};
use tandem_tests::{Scripted, start_coordinator};
use tonic::Code;

fn log_snapshot(log: &MemLog) -> Vec<String> {
    log.scan(None, &[], usize::MAX)
        .expect("scan")
        .iter()
        .map(|r| format!("{r:?}"))
        .collect()
}

async fn setup() -> (
    Arc<MemLog>,
    RunningCoordinator,
    CoordinatorClient<tonic::transport::Channel>,
) {
    let log = Arc::new(MemLog::new());
    let coord = start_coordinator(log.clone()).await;
    let raw = CoordinatorClient::connect(coord.url())
        .await
        .expect("connect");
    (log, coord, raw)
}

fn branch(endpoint: &str, resource: &str, payload: Vec<u8>) -> pb::BranchSpec {
    pb::BranchSpec {
        endpoint: endpoint.into(),
        resource: resource.into(),
        payload: payload.into(),
        ..Default::default()
    }
}

// Rule: every malformed Submit is INVALID_ARGUMENT and records nothing.
#[tokio::test]
async fn malformed_submits_are_invalid_and_change_nothing() {
    let (log, _coord, mut raw) = setup().await;
    let ok = "http://127.0.0.1:9";
    let cases: Vec<(&str, pb::SubmitRequest)> = vec![
        (
            "no mode",
            pb::SubmitRequest {
                labels: Default::default(),
                mode: 0,
                timeout_ms: 0,
                branches: vec![branch(ok, "r", vec![])],
                gtid: String::new(),
            },
        ),
        (
            "unknown mode",
            pb::SubmitRequest {
                labels: Default::default(),
                mode: 42,
                timeout_ms: 0,
                branches: vec![branch(ok, "r", vec![])],
                gtid: String::new(),
            },
        ),
        (
            "no branches",
            pb::SubmitRequest {
                labels: Default::default(),
                mode: 1,
                timeout_ms: 0,
                branches: vec![],
                gtid: String::new(),
            },
        ),
        (
            "empty endpoint",
            pb::SubmitRequest {
                labels: Default::default(),
                mode: 1,
                timeout_ms: 0,
                branches: vec![branch("", "r", vec![])],
                gtid: String::new(),
            },
        ),
        (
            "endpoint not a URI",
            pb::SubmitRequest {
                labels: Default::default(),
                mode: 1,
                timeout_ms: 0,
                branches: vec![branch("not a uri", "r", vec![])],
                gtid: String::new(),
            },
        ),
        (
            "endpoint with a path",
            pb::SubmitRequest {
                labels: Default::default(),
                mode: 1,
                timeout_ms: 0,
                branches: vec![branch("http://127.0.0.1:9/bank", "r", vec![])],
                gtid: String::new(),
            },
        ),
        (
            "endpoint wrong scheme",
            pb::SubmitRequest {
                labels: Default::default(),
                mode: 1,
                timeout_ms: 0,
                branches: vec![branch("ftp://h:1", "r", vec![])],
                gtid: String::new(),
            },
        ),
        (
            "empty resource",
            pb::SubmitRequest {
                labels: Default::default(),
                mode: 1,
                timeout_ms: 0,
                branches: vec![branch(ok, "", vec![])],
                gtid: String::new(),
            },
        ),
        (
            "payload over 1 MiB",
            pb::SubmitRequest {
                labels: Default::default(),
                mode: 1,
                timeout_ms: 0,
                branches: vec![branch(ok, "r", vec![0; 1024 * 1024 + 1])],
                gtid: String::new(),
            },
        ),
        (
            "timeout above max",
            pb::SubmitRequest {
                labels: Default::default(),
                mode: 1,
                timeout_ms: u64::MAX / 2,
                branches: vec![branch(ok, "r", vec![])],
                gtid: String::new(),
            },
        ),
    ];
    for (what, req) in cases {
        let before = log_snapshot(&log);
        let status = raw.submit(req).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(!status.message().is_empty(), "{what}: no message");
        assert_eq!(log_snapshot(&log), before, "{what} changed the log");
    }
    assert!(log_snapshot(&log).is_empty());
}

// Rule: unknown gtid → NOT_FOUND, malformed gtid → INVALID_ARGUMENT, for
// every call that takes one; nothing is written.
#[tokio::test]
async fn unknown_and_malformed_gtids() {
    let (log, _coord, mut raw) = setup().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let b = Some(branch("http://127.0.0.1:9", "r", vec![]));
    for (gtid, code) in [
        (unknown.as_str(), Code::NotFound),
        ("nope", Code::InvalidArgument),
        ("", Code::InvalidArgument),
    ] {
        let g = gtid.to_string();
        let s = raw
            .commit(pb::CommitRequest { gtid: g.clone() })
            .await
            .expect_err("commit");
        assert_eq!(s.code(), code, "commit {gtid:?}");
        let s = raw
            .rollback(pb::RollbackRequest {
                gtid: g.clone(),
                reason: String::new(),
            })
            .await
            .expect_err("rb");
        assert_eq!(s.code(), code, "rollback {gtid:?}");
        let s = raw
            .enlist(pb::EnlistRequest {
                gtid: g.clone(),
                branch: b.clone(),
            })
            .await
            .expect_err("enlist");
        assert_eq!(s.code(), code, "enlist {gtid:?}");
        let s = raw
            .get_transaction(pb::GetTransactionRequest { gtid: g })
            .await
            .expect_err("get");
        assert_eq!(s.code(), code, "get {gtid:?}");
    }
    assert!(log_snapshot(&log).is_empty());
}

// Rule: commit after rollback → FAILED_PRECONDITION (the decision stands),
// rollback after commit likewise, and neither changes the record.
#[tokio::test]
async fn wrong_state_calls_are_refused() {
    let (log, coord, _raw) = setup().await;
    let p = Scripted::yes("p");
    let pp = p.serve().await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");

    let rolled = client.begin(Mode::TwoPhase).await.expect("begin");
    client
        .enlist(rolled, Branch::new(pp.url(), "r", "x"))
        .await
        .expect("enlist");
    client
        .rollback(rolled, "changed my mind")
        .await
        .expect("rollback");
    let before = log_snapshot(&log);
    let err = client
        .commit(rolled)
        .await
        .expect_err("commit after rollback");
    assert!(
        matches!(&err, Error::Invalid { code: Code::FailedPrecondition, message } if message.contains("ABORTED")),
        "{err:?}"
    );
    let err = client
        .enlist(rolled, Branch::new(pp.url(), "r", "x"))
        .await
        .expect_err("enlist after rollback");
    assert!(
        matches!(
            err,
            Error::Invalid {
                code: Code::FailedPrecondition,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(log_snapshot(&log), before);

    let committed = client.begin(Mode::TwoPhase).await.expect("begin");
    client
        .enlist(committed, Branch::new(pp.url(), "r", "x"))
        .await
        .expect("enlist");
    client.commit(committed).await.expect("commit");
    let before = log_snapshot(&log);
    let err = client
        .rollback(committed, "")
        .await
        .expect_err("rollback after commit");
    assert!(
        matches!(&err, Error::Invalid { code: Code::FailedPrecondition, message } if message.contains("never reversed")),
        "{err:?}"
    );
    assert_eq!(log_snapshot(&log), before);
    assert_eq!(p.counts(), (2, 1, 1));
}

// Rule: an enlist with a bad branch is refused and leaves the transaction
// ACTIVE and unchanged; a payload over the limit is refused the same way.
#[tokio::test]
async fn bad_enlist_leaves_the_transaction_unchanged() {
    let (log, coord, _raw) = setup().await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let gtid = client.begin(Mode::TwoPhase).await.expect("begin");
    let before = log_snapshot(&log);
    for (what, b) in [
        ("empty endpoint", Branch::new("", "r", "x")),
        ("empty resource", Branch::new("http://127.0.0.1:9", "", "x")),
        (
            "payload over limit",
            Branch::new("http://127.0.0.1:9", "r", vec![1u8; 1024 * 1024 + 1]),
        ),
    ] {
        let err = client.enlist(gtid, b).await.expect_err(what);
        assert!(
            matches!(
                err,
                Error::Invalid {
                    code: Code::InvalidArgument,
                    ..
                }
            ),
            "{what}: {err:?}"
        );
        assert_eq!(log_snapshot(&log), before, "{what} changed the log");
    }
    let info = client.get(gtid).await.expect("get");
    assert_eq!(info.state, pb::TxState::Active as i32);
    assert!(info.branches.is_empty());
}

/// A `SubmitRequest` / `GetTransactionRequest` with its gtid as raw bytes,
/// so that a test can send a gtid that is not UTF-8 (the field's tag and
/// wire type are those of the real messages).
#[derive(Clone, PartialEq, prost::Message)]
struct RawGtid {
    #[prost(bytes = "vec", tag = "1")]
    gtid: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawSubmit {
    #[prost(int32, tag = "1")]
    mode: i32,
    #[prost(message, repeated, tag = "3")]
    branches: Vec<pb::BranchSpec>,
    #[prost(bytes = "vec", tag = "4")]
    gtid: Vec<u8>,
}

async fn raw_call<M: prost::Message + Send + Sync + 'static>(
    url: &str,
    path: &'static str,
    msg: M,
) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<M, pb::TransactionInfo>::default();
    grpc.unary(
        tonic::Request::new(msg),
        http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .expect_err("a gtid that is not UTF-8 is refused")
}

// Rule: a request that is not a valid message (here a gtid that is not
// UTF-8) is INVALID_ARGUMENT, like any other bad input, and records nothing.
#[tokio::test]
async fn a_gtid_that_is_not_utf8_is_invalid_and_changes_nothing() {
    let (log, coord, _raw) = setup().await;
    let p = Scripted::yes("p");
    let pp = p.serve().await;
    let before = log_snapshot(&log);
    let bad = vec![0xff, 0xfe, b'a'];
    let get = raw_call(
        &coord.url(),
        "/tandem.v1.Coordinator/GetTransaction",
        RawGtid { gtid: bad.clone() },
    )
    .await;
    assert_eq!(get.code(), Code::InvalidArgument, "{get:?}");
    assert!(get.message().contains("UTF-8"), "{}", get.message());
    let submit = raw_call(
        &coord.url(),
        "/tandem.v1.Coordinator/Submit",
        RawSubmit {
            mode: pb::Mode::TwoPhase as i32,
            branches: vec![branch(&pp.url(), "r", b"x".to_vec())],
            gtid: bad,
        },
    )
    .await;
    assert_eq!(submit.code(), Code::InvalidArgument, "{submit:?}");
    assert_eq!(log_snapshot(&log), before);
    assert_eq!(p.counts(), (0, 0, 0), "no participant was called");
}
