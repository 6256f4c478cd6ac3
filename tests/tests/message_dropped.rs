//! A dropped message stays dropped: a repeated PrepareMessage (the SDK
//! repeats one whose reply was lost) or a late SubmitMessage is answered
//! ABORTED, whoever dropped it; an operator cannot drop one whose local
//! transaction may still commit. An in-process coordinator, real tonic
//! servers on loopback, a real sled log.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tandem_coordinator::log::SledLog;
use tandem_coordinator::server::RunningCoordinator;
use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_client::AdminClient;
use tandem_sdk::{
    Branch, BranchContext, Error, Gtid, HandlerError, Message, MessageCheck, ParticipantServer,
    TransactionClient,
};
use tandem_tests::{eventually_async, spawn, test_config};

#[derive(Default)]
struct Count(AtomicUsize);

impl Message for Count {
    async fn deliver(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct No;

impl MessageCheck for No {
    async fn check(&self, _: &BranchContext, _: &[u8]) -> Result<bool, HandlerError> {
        Ok(false)
    }
}

async fn reaches(client: &TransactionClient, gtid: Gtid, state: pb::TxState) {
    eventually_async(&format!("{gtid} {state:?}"), || async {
        client.get(gtid).await.is_ok_and(|i| i.state() == state)
    })
    .await;
}

// PrepareMessage is what the business service commits its local
// transaction on: repeated for a message dropped by its client's Rollback
// or by its check's no, it answers ABORTED, and so does a late Submit.
// An operator's abort within the deadline is refused, and the message is
// delivered on its Submit.
#[tokio::test]
async fn a_dropped_message_is_never_prepared_again() {
    let inbox = Arc::new(Count::default());
    let pa = spawn(ParticipantServer::new().message("inbox", inbox.clone())).await;
    let checks = spawn(ParticipantServer::new().check("orders", No)).await;
    let dir = tempfile::tempdir().expect("dir");
    let log = Arc::new(SledLog::open(dir.path()).expect("log"));
    let coord = RunningCoordinator::start(test_config(), log)
        .await
        .expect("coordinator");
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let check = Branch::new(checks.url(), "orders", "");
    let deliveries = vec![Branch::new(pa.url(), "inbox", "sms")];
    for how in ["client rollback", "check said no"] {
        let gtid = Gtid::now_v7();
        let timeout = Duration::from_millis(if how == "check said no" { 100 } else { 30_000 });
        let prepare =
            || client.prepare_message(gtid, check.clone(), deliveries.clone(), Some(timeout));
        prepare().await.expect("prepare");
        if how == "client rollback" {
            client
                .rollback(gtid, "local failed")
                .await
                .expect("rollback");
        }
        reaches(&client, gtid, pb::TxState::Aborted).await;
        let again = prepare().await;
        assert!(
            matches!(again, Err(Error::Aborted { .. })),
            "{how}: {again:?}"
        );
        let submit = client.submit_message(gtid).await;
        assert!(
            matches!(submit, Err(Error::Aborted { .. })),
            "{how}: {submit:?}"
        );
    }
    assert_eq!(inbox.0.load(Ordering::SeqCst), 0);

    let mut admin = AdminClient::connect(coord.url()).await.expect("admin");
    let gtid = Gtid::now_v7();
    client
        .prepare_message(gtid, check.clone(), deliveries.clone(), None)
        .await
        .expect("prepare");
    let refused = admin
        .abort_transaction(pb::AbortTransactionRequest {
            gtid: gtid.to_string(),
            reason: "looked abandoned".into(),
        })
        .await
        .expect_err("an operator's abort of a message within its deadline");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    client
        .prepare_message(gtid, check.clone(), deliveries.clone(), None)
        .await
        .expect("a repeated prepare of a live message");
    client.submit_message(gtid).await.expect("submit");
    reaches(&client, gtid, pb::TxState::Committed).await;
    assert_eq!(inbox.0.load(Ordering::SeqCst), 1);
}

// A message whose back-check could not be reached is STUCK, undecided;
// its business service (whose local transaction did not commit) rolls
// it back: dropped now, nothing delivered, and a late Submit is ABORTED.
#[tokio::test]
async fn a_stuck_message_is_dropped_by_its_business_services_rollback() {
    let inbox = Arc::new(Count::default());
    let pa = spawn(ParticipantServer::new().message("inbox", inbox.clone())).await;
    let dir = tempfile::tempdir().expect("dir");
    let log = Arc::new(SledLog::open(dir.path()).expect("log"));
    let mut config = test_config();
    config.retry.max_attempts = Some(2);
    let coord = RunningCoordinator::start(config, log)
        .await
        .expect("coordinator");
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let down = format!("http://{}", tandem_tests::process::free_addr());
    let gtid = Gtid::now_v7();
    client
        .prepare_message(
            gtid,
            Branch::new(down, "orders", ""),
            vec![Branch::new(pa.url(), "inbox", "sms")],
            Some(Duration::from_millis(100)),
        )
        .await
        .expect("prepare");
    reaches(&client, gtid, pb::TxState::Stuck).await;
    client
        .rollback(gtid, "the order was not saved")
        .await
        .expect("rollback");
    reaches(&client, gtid, pb::TxState::Aborted).await;
    let late = client.submit_message(gtid).await;
    assert!(matches!(late, Err(Error::Aborted { .. })), "{late:?}");
    assert_eq!(inbox.0.load(Ordering::SeqCst), 0);
}
