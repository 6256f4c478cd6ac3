//! Aborts carry their cause as fields in one shape: `AbortInfo` in
//! SubmitResponse, RollbackResponse and TransactionInfo, and the same
//! message as a `google.rpc.Status` detail on the ABORTED status of Enlist
//! and Commit. Real coordinator, real participants, raw gRPC client.

use std::sync::Arc;
use std::time::Duration;

use tandem_coordinator::log::MemLog;
use tandem_coordinator::service::abort_detail;
use tandem_proto::v1 as pb;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_tests::{Script, Scripted, start_coordinator};
use tonic::Code;

fn spec(url: &str) -> pb::BranchSpec {
    pb::BranchSpec {
        endpoint: url.to_string(),
        resource: "r".into(),
        payload: b"x".to_vec().into(),
        ..Default::default()
    }
}

fn says_no(reason: &str) -> Arc<Scripted> {
    let script = Script {
        vote_no: Some(reason.to_string()),
        ..Script::default()
    };
    Scripted::new("no", script, None)
}

#[tokio::test]
async fn submit_reports_the_branch_and_the_participants_own_reason() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let (yes, no) = (Scripted::yes("yes"), says_no("insufficient funds"));
    let (py, pn) = (yes.serve().await, no.serve().await);
    let mut rpc = CoordinatorClient::connect(coord.url())
        .await
        .expect("connect");

    let out = rpc
        .submit(pb::SubmitRequest {
            mode: pb::Mode::TwoPhase as i32,
            branches: vec![spec(&py.url()), spec(&pn.url())],
            ..Default::default()
        })
        .await
        .expect("submit answers an abort with OK")
        .into_inner();
    let abort = out.abort.expect("abort info");
    assert_eq!(abort.cause, pb::AbortCause::VotedNo as i32);
    assert_eq!((abort.branch_id, abort.resource.as_str()), (2, "r"));
    assert_eq!(abort.detail, "insufficient funds");
    assert!(out.reason.contains("insufficient funds"), "{}", out.reason);

    // The record says the same, and a Rollback of the aborted transaction
    // answers its state with the first cause.
    let info = rpc
        .get_transaction(pb::GetTransactionRequest {
            gtid: out.gtid.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.abort, Some(abort.clone()));
    let rolled = rpc
        .rollback(pb::RollbackRequest {
            gtid: out.gtid,
            reason: "late".into(),
        })
        .await
        .expect("rollback of an aborted transaction")
        .into_inner();
    assert_eq!(rolled.abort, Some(abort));
}

#[tokio::test]
async fn enlist_reports_the_same_fields_as_a_status_detail() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let no = says_no("");
    let pn = no.serve().await;
    let mut rpc = CoordinatorClient::connect(coord.url())
        .await
        .expect("connect");
    let gtid = rpc
        .begin(pb::BeginRequest {
            mode: pb::Mode::TwoPhase as i32,
            ..Default::default()
        })
        .await
        .expect("begin")
        .into_inner()
        .gtid;
    let status = rpc
        .enlist(pb::EnlistRequest {
            gtid: gtid.clone(),
            branch: Some(spec(&pn.url())),
        })
        .await
        .expect_err("the no aborts");
    assert_eq!(status.code(), Code::Aborted);
    let abort = abort_detail::abort_info(&status).expect("an AbortInfo detail");
    assert_eq!(abort.cause, pb::AbortCause::VotedNo as i32);
    assert_eq!((abort.branch_id, abort.detail.as_str()), (1, ""));
    assert!(
        status.message().ends_with("branch 1 (r) voted no"),
        "an empty reason leaves no dangling colon: {}",
        status.message()
    );
}

#[tokio::test]
async fn commit_past_the_deadline_reports_the_deadline() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let yes = Scripted::yes("yes");
    let py = yes.serve().await;
    let mut rpc = CoordinatorClient::connect(coord.url())
        .await
        .expect("connect");
    let gtid = rpc
        .begin(pb::BeginRequest {
            mode: pb::Mode::TwoPhase as i32,
            timeout_ms: 300,
            ..Default::default()
        })
        .await
        .expect("begin")
        .into_inner()
        .gtid;
    rpc.enlist(pb::EnlistRequest {
        gtid: gtid.clone(),
        branch: Some(spec(&py.url())),
    })
    .await
    .expect("enlist");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = rpc
        .commit(pb::CommitRequest { gtid: gtid.clone() })
        .await
        .expect_err("the deadline passed");
    let info = rpc
        .get_transaction(pb::GetTransactionRequest { gtid })
        .await
        .expect("get")
        .into_inner();
    let abort = info.abort.expect("abort info");
    assert_eq!(abort.cause, pb::AbortCause::Deadline as i32);
    assert_eq!(abort.branch_id, 0);
    // Decided by the deadline timer before the call, the commit is refused
    // as a wrong state; decided by the call, it is ABORTED with the detail.
    match status.code() {
        Code::Aborted => assert_eq!(abort_detail::abort_info(&status), Some(abort)),
        Code::FailedPrecondition => {}
        other => panic!("unexpected {other:?}: {}", status.message()),
    }
}
