//! The participant server as a product: what it refuses at start, and what
//! a coordinator's cancelled call (deadline passed, disconnect) leaves
//! behind. One rule per test.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_proto::v1::BranchRequest;
use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_sdk::barrier::{BarrierStore, BranchKey, Mark, MemBarrier};
use tandem_sdk::{ParticipantServer, ServeError};
use tandem_tests::{Script, Scripted, eventually_async, spawn};
use tonic::Request;
use uuid::Uuid;

fn req(gtid: Uuid) -> BranchRequest {
    BranchRequest {
        gtid: gtid.to_string(),
        branch_id: 1,
        resource: "r".into(),
        payload: "x".into(),
        attempt: 1,
        epoch: 1,
        mode: 0,
    }
}

/// `req` with a deadline of `ms` milliseconds (sent as `grpc-timeout`; the
/// server drops the call's future when it passes).
fn hurried(gtid: Uuid, ms: u64) -> Request<BranchRequest> {
    let mut r = Request::new(req(gtid));
    r.set_timeout(Duration::from_millis(ms));
    r
}

async fn mark(store: &MemBarrier, gtid: Uuid) -> Option<Mark> {
    let key = BranchKey { gtid, branch_id: 1 };
    let entry = store.enter(key).await.expect("enter");
    entry.record().map(|r| r.mark)
}

// Rule: a resource name takes one handler. Registering it twice (same or
// other protocol) is refused when the server is built, naming the resource
// and both protocols, instead of one handler silently replacing the other.
#[tokio::test]
async fn a_resource_registered_twice_is_refused_at_start() {
    let a = Scripted::yes("a");
    let b = Scripted::yes("b");
    let twice = ParticipantServer::new()
        .two_phase("accounts", a.clone())
        .two_phase("accounts", b.clone());
    let err = match twice.clone().spawn("127.0.0.1:0".parse().unwrap()).await {
        Err(e) => e,
        Ok(_) => panic!("a server with two handlers for one resource started"),
    };
    assert!(
        matches!(&err, ServeError::DuplicateResource { resource, first: "2PC", second: "2PC" } if resource == "accounts"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("\"accounts\"") && text.contains("2PC"),
        "{text}"
    );
    assert!(matches!(
        twice.clone().into_service(),
        Err(ServeError::DuplicateResource { .. })
    ));
    assert!(matches!(
        twice.serve("127.0.0.1:0".parse().unwrap()).await,
        Err(ServeError::DuplicateResource { .. })
    ));

    let mixed = ParticipantServer::new()
        .two_phase("accounts", a.clone())
        .tcc("accounts", b.clone());
    match mixed.into_service() {
        Err(ServeError::DuplicateResource { first, second, .. }) => {
            assert_eq!((first, second), ("2PC", "TCC"));
        }
        _ => panic!("2PC and TCC handlers under one name were accepted"),
    }

    // Distinct names are fine.
    let ok = ParticipantServer::new()
        .two_phase("accounts", a)
        .tcc("wallets", b);
    assert!(ok.into_service().is_ok());
}

// Rule: a prepare whose call is cancelled while its handler runs still runs
// to completion, barrier record included: a no vote is recorded as refused,
// so a repeated prepare is refused too instead of finding a half-written
// "tried" record and answering yes.
#[tokio::test]
async fn a_cancelled_prepare_runs_to_completion_and_its_vote_is_recorded() {
    let p = Scripted::new(
        "p",
        Script {
            vote_no: Some("insufficient funds".into()),
            prepare_delay: Duration::from_millis(400),
            ..Script::default()
        },
        None,
    );
    let store = MemBarrier::new();
    let server = spawn(
        ParticipantServer::new()
            .barrier(store.clone())
            .two_phase("r", p.clone()),
    )
    .await;
    let mut d = ParticipantClient::connect(server.url()).await.unwrap();
    let gtid = Uuid::now_v7();

    let cut = d.prepare(hurried(gtid, 50)).await;
    assert!(cut.is_err(), "the call should have passed its deadline");

    eventually_async("the cancelled prepare's vote is recorded", || async {
        mark(&store, gtid).await == Some(Mark::Refused)
    })
    .await;
    let again = d.prepare(req(gtid)).await.expect("prepare").into_inner();
    assert!(!again.yes, "the repeat must get the recorded no");
    assert_eq!(p.prepares.load(Ordering::SeqCst), 1, "the handler ran once");
}

// Rule: a commit whose call is cancelled while its handler runs still
// completes and records it; the coordinator's repeat is acknowledged without
// running the handler again.
#[tokio::test]
async fn a_cancelled_commit_runs_to_completion_and_is_recorded() {
    let p = Scripted::new(
        "p",
        Script {
            phase_two_delay: Duration::from_millis(400),
            ..Script::default()
        },
        None,
    );
    let store = MemBarrier::new();
    let server = spawn(
        ParticipantServer::new()
            .barrier(store.clone())
            .two_phase("r", p.clone()),
    )
    .await;
    let mut d = ParticipantClient::connect(server.url()).await.unwrap();
    let gtid = Uuid::now_v7();
    assert!(
        d.prepare(req(gtid))
            .await
            .expect("prepare")
            .into_inner()
            .yes
    );

    let cut = d.commit(hurried(gtid, 50)).await;
    assert!(cut.is_err(), "the call should have passed its deadline");

    eventually_async("the cancelled commit is recorded", || async {
        mark(&store, gtid).await == Some(Mark::Confirmed)
    })
    .await;
    assert_eq!(p.commits.load(Ordering::SeqCst), 1);
    assert_eq!(p.held_count(), 0, "the commit's effect is there");
    d.commit(req(gtid)).await.expect("repeated commit");
    assert_eq!(p.commits.load(Ordering::SeqCst), 1, "the handler ran once");
}
