//! One transaction holding 2PC and TCC branches: a TCC inventory
//! reservation and a 2PC payment in one order, served by one participant
//! process that registers each resource under its own protocol (no
//! adapter). Real coordinator on a sled log, real participant server.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::log::conformance::sample_record;
use tandem_coordinator::log::{SledLog, TxnLog};
use tandem_coordinator::model::{BranchState, Decision, Mode as LogMode, TxState};
use tandem_coordinator::runtime::{CallFuture, Environment, Transport};
use tandem_coordinator::{Coordinator, CoordinatorConfig};
use tandem_proto::v1 as pb;
use tandem_proto::v1::{BranchRequest, VoteResponse};
use tandem_sdk::{Branch, Error, Mode, ParticipantServer, RunningParticipant, TransactionClient};
use tandem_tests::{Script, Scripted, eventually, spawn, start_coordinator};

/// One process: "inventory" is TCC, "payments" is 2PC.
async fn shop(inventory: &Arc<Scripted>, payments: &Arc<Scripted>) -> RunningParticipant {
    spawn(
        ParticipantServer::new()
            .tcc("inventory", inventory.clone())
            .two_phase("payments", payments.clone()),
    )
    .await
}

fn order(p: &RunningParticipant) -> Vec<Branch> {
    vec![
        Branch::new(p.url(), "inventory", "sku-7:1").mode(Mode::Tcc),
        Branch::new(p.url(), "payments", "card-7:80").mode(Mode::TwoPhase),
    ]
}

fn declines(name: &str) -> Arc<Scripted> {
    let script = Script {
        vote_no: Some("card declined".into()),
        ..Script::default()
    };
    Scripted::new(name, script, None)
}

#[tokio::test]
async fn a_mixed_order_commits_with_each_branch_in_its_own_protocol() {
    let dir = tempfile::tempdir().expect("dir");
    let coord = start_coordinator(Arc::new(SledLog::open(dir.path()).expect("log"))).await;
    let (inventory, payments) = (Scripted::yes("inventory"), Scripted::yes("payments"));
    let p = shop(&inventory, &payments).await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");

    // Either transaction mode: each branch names its own.
    for mode in [Mode::TwoPhase, Mode::Tcc] {
        let done = client.submit(mode, order(&p)).await.expect("submit");
        assert!(done.complete);
        let info = client.get(done.gtid).await.expect("get");
        assert_eq!(info.state, pb::TxState::Committed as i32);
        let branches: Vec<(i32, i32)> = info.branches.iter().map(|b| (b.mode, b.state)).collect();
        assert_eq!(
            branches,
            vec![
                (pb::Mode::Tcc as i32, pb::BranchState::Confirmed as i32),
                (pb::Mode::TwoPhase as i32, pb::BranchState::Committed as i32),
            ]
        );
    }
    assert_eq!(inventory.counts(), (2, 2, 0), "tried and confirmed twice");
    assert_eq!(payments.counts(), (2, 2, 0), "prepared and committed twice");

    // Interactive: the default mode for one branch, the other named.
    let gtid = client.begin(Mode::TwoPhase).await.expect("begin");
    client
        .enlist(gtid, Branch::new(p.url(), "payments", "card-7:80"))
        .await
        .expect("enlist payments (the transaction's 2PC)");
    client
        .enlist(
            gtid,
            Branch::new(p.url(), "inventory", "sku-7:1").mode(Mode::Tcc),
        )
        .await
        .expect("enlist inventory (TCC)");
    client.commit(gtid).await.expect("commit");
    assert_eq!(inventory.counts(), (3, 3, 0));
    assert_eq!(payments.counts(), (3, 3, 0));
}

// The 2PC payment votes no: the reserved stock is cancelled, the payment
// (which holds nothing after its no) gets no rollback.
#[tokio::test]
async fn a_declined_payment_cancels_the_reservation_only() {
    let coord = start_coordinator(Arc::new(tandem_coordinator::log::MemLog::new())).await;
    let (inventory, payments) = (Scripted::yes("inventory"), declines("payments"));
    let p = shop(&inventory, &payments).await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let err = client
        .submit(Mode::Tcc, order(&p))
        .await
        .expect_err("declined");
    assert!(
        matches!(&err, Error::Aborted { reason, .. } if reason.contains("card declined")),
        "{err:?}"
    );
    // The SDK hands over the fields: cause, branch, resource, the
    // participant's own words.
    assert_eq!(err.abort_cause(), Some(tandem_sdk::AbortCause::VotedNo));
    let Error::Aborted { abort: Some(a), .. } = &err else {
        panic!("no AbortInfo: {err:?}")
    };
    assert_eq!(
        (a.branch_id, a.resource.as_str(), a.detail.as_str()),
        (2, "payments", "card declined")
    );
    // Interactively, the same fields arrive as the ABORTED status's detail.
    let gtid = client.begin(Mode::TwoPhase).await.expect("begin");
    let err = client
        .enlist(gtid, Branch::new(p.url(), "payments", "card-7:80"))
        .await
        .expect_err("declined");
    assert_eq!(err.abort_cause(), Some(tandem_sdk::AbortCause::VotedNo));
    eventually("the reservation is cancelled", || {
        inventory.counts() == (1, 0, 1)
    })
    .await;
    assert_eq!(payments.counts(), (2, 0, 0), "a 2PC no gets no rollback");
}

// Without its mode, a branch runs the transaction's protocol: a TCC
// resource called in a 2PC transaction refuses the prepare, and the
// transaction aborts (the message names the mismatch).
#[tokio::test]
async fn a_branch_without_a_mode_runs_the_transactions() {
    let coord = start_coordinator(Arc::new(tandem_coordinator::log::MemLog::new())).await;
    let (inventory, payments) = (Scripted::yes("inventory"), Scripted::yes("payments"));
    let p = shop(&inventory, &payments).await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let err = client
        .submit(
            Mode::TwoPhase,
            vec![Branch::new(p.url(), "inventory", "sku-7:1")],
        )
        .await
        .expect_err("inventory is TCC");
    assert!(
        matches!(&err, Error::Aborted { reason, .. } if reason.contains("TCC")),
        "{err:?}"
    );
    assert_eq!(inventory.counts().1, 0);
    // The participant answered UNIMPLEMENTED (nothing ran), so the branch
    // needs no rollback: the abort is finished, not retried for an hour.
    let Error::Aborted {
        gtid: Some(gtid), ..
    } = err
    else {
        panic!("no gtid")
    };
    let info = client.get(gtid).await.expect("get");
    assert_eq!(info.state, pb::TxState::Aborted as i32);
    assert_eq!(info.branches[0].attempts, 0);
}

/// Acknowledges every phase-2 call and notes its protocol.
#[derive(Default)]
struct Calls(Mutex<Vec<(u32, LogMode, bool)>>);

impl Transport for Calls {
    fn phase_one(
        &self,
        _: &str,
        _: LogMode,
        _: BranchRequest,
        _trace: Option<tandem_coordinator::model::TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, VoteResponse> {
        Box::pin(async { Err("no phase 1 in this test".into()) })
    }
    fn phase_two(
        &self,
        _: &str,
        mode: LogMode,
        commit: bool,
        req: BranchRequest,
        _trace: Option<tandem_coordinator::model::TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, ()> {
        self.0
            .lock()
            .expect("calls")
            .push((req.branch_id, mode, commit));
        Box::pin(async { Ok(()) })
    }
}

// After a restart, recovery calls each branch of a decided mixed
// transaction with the protocol its record keeps (read back from sled).
#[tokio::test]
async fn recovery_drives_each_branch_in_its_recorded_protocol() {
    let dir = tempfile::tempdir().expect("dir");
    let mut rec = sample_record(LogMode::TwoPhase, 2);
    rec.branches[0].mode = LogMode::Tcc;
    rec.branches[1].mode = LogMode::TwoPhase;
    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    for b in &mut rec.branches {
        b.state = BranchState::Prepared;
        b.payload = Bytes::from_static(b"p");
    }
    {
        let log = SledLog::open(dir.path()).expect("log");
        log.write(&rec).expect("write");
        log.force().await.expect("force");
    }
    let log = Arc::new(SledLog::open(dir.path()).expect("reopen"));
    let read = log.get(&rec.gtid).expect("get").expect("record");
    assert_eq!(
        read.branches[0].mode,
        LogMode::Tcc,
        "the mode survives a reopen"
    );
    let calls = Arc::new(Calls::default());
    let env = Environment {
        transport: Some(calls.clone()),
        ..Environment::default()
    };
    let coord =
        Coordinator::with_environment(CoordinatorConfig::default(), log, env).expect("coordinator");
    coord
        .start_recovery()
        .await
        .expect("start")
        .await
        .expect("join")
        .expect("recovery");
    eventually("committed", || {
        coord
            .get(rec.gtid)
            .is_ok_and(|r| r.state == TxState::Committed)
    })
    .await;
    let mut calls = calls.0.lock().expect("calls").clone();
    calls.sort_by_key(|c| c.0);
    assert_eq!(
        calls,
        vec![(1, LogMode::Tcc, true), (2, LogMode::TwoPhase, true)]
    );
}
