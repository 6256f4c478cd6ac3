//! A client that gives up (its deadline passes, it disconnects) changes
//! nothing: the coordinator drives every transaction to its end by itself.
//! Also: repeated starts with a client-chosen gtid, and live views.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_coordinator::log::MemLog;
use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_client::AdminClient;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_sdk::{Branch, Mode, TransactionClient};
use tandem_tests::{Script, Scripted, eventually_async, start_coordinator};

type Rpc = CoordinatorClient<tonic::transport::Channel>;

fn spec(url: String) -> pb::BranchSpec {
    pb::BranchSpec {
        endpoint: url,
        resource: "r".into(),
        payload: b"x".to_vec().into(),
        ..Default::default()
    }
}

fn with_deadline<T>(msg: T, ms: u64) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(Duration::from_millis(ms));
    req
}

async fn state_of(rpc: &Rpc, gtid: &str) -> (i32, Vec<i32>) {
    let info = rpc
        .clone()
        .get_transaction(pb::GetTransactionRequest { gtid: gtid.into() })
        .await
        .expect("get")
        .into_inner();
    (info.state, info.branches.iter().map(|b| b.state).collect())
}

async fn wait_state(rpc: &Rpc, gtid: &str, want: pb::TxState) {
    let what = format!("{gtid} reaches {want:?}");
    eventually_async(&what, || async {
        state_of(rpc, gtid).await.0 == want as i32
    })
    .await;
}

// Rule: a Submit whose client gave up while a commit call was in flight is
// still committed, with commit run once (it once stayed COMMITTING forever).
#[tokio::test]
async fn submit_cancelled_during_phase_two_still_commits() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let script = Script {
        phase_two_delay: Duration::from_millis(400),
        ..Script::default()
    };
    let slow = Scripted::new("slow", script, None);
    let p = slow.serve().await;
    let mut rpc = Rpc::connect(coord.url()).await.expect("connect");
    let gtid = uuid::Uuid::now_v7().to_string();
    let req = pb::SubmitRequest {
        labels: Default::default(),
        mode: pb::Mode::TwoPhase as i32,
        timeout_ms: 0,
        branches: vec![spec(p.url())],
        gtid: gtid.clone(),
    };
    let status = rpc.submit(with_deadline(req, 150)).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    wait_state(&rpc, &gtid, pb::TxState::Committed).await;
    assert_eq!(slow.commits.load(Ordering::SeqCst), 1);
}

// Rule: a Submit whose client gave up during a prepare that outlives the
// transaction's deadline aborts at the deadline (GetOutcome ABORT), and the
// branch is rolled back once its prepare returns.
#[tokio::test]
async fn submit_cancelled_during_phase_one_aborts_at_its_deadline() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let script = Script {
        prepare_delay: Duration::from_millis(1500),
        ..Script::default()
    };
    let hang = Scripted::new("hang", script, None);
    let p = hang.serve_tcc().await;
    let mut rpc = Rpc::connect(coord.url()).await.expect("connect");
    let gtid = uuid::Uuid::now_v7().to_string();
    let req = pb::SubmitRequest {
        labels: Default::default(),
        mode: pb::Mode::Tcc as i32,
        timeout_ms: 400,
        branches: vec![spec(p.url())],
        gtid: gtid.clone(),
    };
    assert!(rpc.submit(with_deadline(req, 100)).await.is_err());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let outcome = rpc
        .get_outcome(pb::GetOutcomeRequest { gtid: gtid.clone() })
        .await
        .expect("outcome")
        .into_inner();
    assert_eq!(outcome.outcome, pb::Outcome::Abort as i32);
    wait_state(&rpc, &gtid, pb::TxState::Aborted).await;
    assert_eq!(hang.rollbacks.load(Ordering::SeqCst), 1);
}

// Rule: an Enlist whose client gave up mid-prepare leaves a usable
// transaction: the prepare's answer is recorded, and Commit (or Rollback)
// finishes it (it once stayed ABORTING forever with no rollback sent).
#[tokio::test]
async fn enlist_cancelled_mid_prepare_leaves_a_usable_transaction() {
    for commit in [true, false] {
        let coord = start_coordinator(Arc::new(MemLog::new())).await;
        let script = Script {
            prepare_delay: Duration::from_millis(300),
            ..Script::default()
        };
        let slow = Scripted::new("slow", script, None);
        let p = slow.serve().await;
        let mut rpc = Rpc::connect(coord.url()).await.expect("connect");
        let gtid = rpc
            .begin(pb::BeginRequest {
                mode: pb::Mode::TwoPhase as i32,
                ..Default::default()
            })
            .await
            .expect("begin")
            .into_inner()
            .gtid;
        let req = pb::EnlistRequest {
            gtid: gtid.clone(),
            branch: Some(spec(p.url())),
        };
        assert!(rpc.enlist(with_deadline(req, 100)).await.is_err());
        let prepared = pb::BranchState::Prepared as i32;
        eventually_async("the prepare's yes is recorded", || async {
            state_of(&rpc, &gtid).await.1 == vec![prepared]
        })
        .await;
        if commit {
            let r = rpc.commit(pb::CommitRequest { gtid: gtid.clone() }).await;
            assert_eq!(
                r.expect("commit").into_inner().state,
                pb::TxState::Committed as i32
            );
            assert_eq!(slow.commits.load(Ordering::SeqCst), 1);
        } else {
            rpc.rollback(pb::RollbackRequest {
                gtid: gtid.clone(),
                reason: String::new(),
            })
            .await
            .expect("rollback");
            wait_state(&rpc, &gtid, pb::TxState::Aborted).await;
            assert_eq!(slow.rollbacks.load(Ordering::SeqCst), 1);
        }
    }
}

// Rule: a Submit repeated with its gtid returns the first one's outcome
// (state, replies) and runs nothing twice, even when the first call was
// cut off midway; other branches under that gtid are ALREADY_EXISTS; a
// gtid that is not a recent UUID v7 is INVALID_ARGUMENT.
#[tokio::test]
async fn a_repeated_submit_returns_the_same_transaction() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let script = Script {
        prepare_delay: Duration::from_millis(200),
        ..Script::default()
    };
    let slow = Scripted::new("slow", script, None);
    let p = slow.serve().await;
    let mut rpc = Rpc::connect(coord.url()).await.expect("connect");
    let gtid = uuid::Uuid::now_v7();
    let req = |branches| pb::SubmitRequest {
        labels: Default::default(),
        mode: pb::Mode::TwoPhase as i32,
        timeout_ms: 0,
        branches,
        gtid: gtid.to_string(),
    };
    assert!(
        rpc.submit(with_deadline(req(vec![spec(p.url())]), 50))
            .await
            .is_err()
    );
    let first = rpc
        .submit(req(vec![spec(p.url())]))
        .await
        .expect("repeat")
        .into_inner();
    let again = rpc
        .submit(req(vec![spec(p.url())]))
        .await
        .expect("again")
        .into_inner();
    assert_eq!(first.gtid, gtid.to_string());
    // Decided commit (COMMITTING while its commit call is still out).
    let committed = [
        pb::TxState::Committed as i32,
        pb::TxState::Committing as i32,
    ];
    assert!(committed.contains(&first.state), "{first:?}");
    assert!(committed.contains(&again.state), "{again:?}");
    assert_eq!((&first.gtid, &first.replies), (&again.gtid, &again.replies));
    assert_eq!(slow.prepares.load(Ordering::SeqCst), 1);
    assert_eq!(slow.commits.load(Ordering::SeqCst), 1);

    let other = rpc
        .submit(req(vec![spec(p.url()), spec(p.url())]))
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::AlreadyExists, "{other:?}");
    let mut v4 = req(vec![spec(p.url())]);
    v4.gtid = "4f1c1a52-1d6e-4c5a-9d0e-2f4f6a1b2c3d".into();
    let bad = rpc.submit(v4).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");

    // The SDK: a lost answer is OutcomeUnknown with the gtid; asking again
    // with it gives the outcome.
    let channel = tonic::transport::Endpoint::from_shared(coord.url())
        .expect("endpoint")
        .timeout(Duration::from_millis(50))
        .connect()
        .await
        .expect("channel");
    let impatient = TransactionClient::from_channel(channel);
    let err = impatient
        .submit(Mode::TwoPhase, vec![Branch::new(p.url(), "r", "y")])
        .await
        .unwrap_err();
    let tandem_sdk::Error::OutcomeUnknown { gtid, .. } = err else {
        panic!("expected OutcomeUnknown, got {err:?}");
    };
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let done = client
        .submit_as(
            gtid,
            Mode::TwoPhase,
            vec![Branch::new(p.url(), "r", "y")],
            None,
        )
        .await
        .expect("outcome");
    assert_eq!(done.gtid, gtid);
    assert_eq!(slow.prepares.load(Ordering::SeqCst), 2);
}

// Rule: GetTransaction and the Admin views show a live transaction as it
// is: a branch that voted yes is PREPARED at once, though a yes is not
// written to the log on its own.
#[tokio::test]
async fn live_views_show_a_yes_vote_at_once() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let p = Scripted::yes("p").serve().await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let gtid = client.begin(Mode::TwoPhase).await.expect("begin");
    client
        .enlist(gtid, Branch::new(p.url(), "r", "x"))
        .await
        .expect("enlist");
    let prepared = pb::BranchState::Prepared as i32;
    let info = client.get(gtid).await.expect("get");
    assert_eq!(info.branches[0].state, prepared);
    let mut admin = AdminClient::connect(coord.url()).await.expect("admin");
    let got = admin
        .get_transaction(pb::AdminGetTransactionRequest {
            gtid: gtid.to_string(),
        })
        .await
        .expect("admin get")
        .into_inner();
    assert_eq!(got.branches[0].state, prepared);
    let listed = admin
        .list_transactions(pb::ListTransactionsRequest {
            states: vec![pb::TxState::Active as i32],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let mine = listed
        .transactions
        .iter()
        .find(|t| t.gtid == gtid.to_string())
        .expect("listed");
    assert_eq!(mine.branches[0].state, prepared);
}
