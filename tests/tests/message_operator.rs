//! Transactional messages: the operator's commands on a message
//! (`tandem tx retry` / `resolve` / `abort`) against a `tandem serve`
//! process that is killed and restarted, and the business service's
//! back-check on PostgreSQL (`PgMessages`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_coordinator::log::SledLog;
use tandem_coordinator::server::RunningCoordinator;
use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_client::AdminClient;
use tandem_sdk::postgres::PgMessages;
use tandem_sdk::{
    Branch, BranchContext, Gtid, HandlerError, Message, MessageCheck, ParticipantServer,
    TransactionClient,
};
use tandem_tests::pg::PgServer;
use tandem_tests::process::{Serve, free_addr, tandem};
use tandem_tests::{eventually_async, spawn, test_config};

#[derive(Default)]
struct Inbox(Mutex<HashMap<Gtid, usize>>);

impl Inbox {
    fn applied(&self, gtid: Gtid) -> usize {
        self.0
            .lock()
            .expect("lock")
            .get(&gtid)
            .copied()
            .unwrap_or(0)
    }
}

impl Message for Inbox {
    async fn deliver(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        *self.0.lock().expect("lock").entry(ctx.gtid).or_default() += 1;
        Ok(())
    }
}

struct Committed;

impl MessageCheck for Committed {
    async fn check(&self, _: &BranchContext, _: &[u8]) -> Result<bool, HandlerError> {
        Ok(true)
    }
}

async fn reaches(
    client: &TransactionClient,
    gtid: Gtid,
    state: pb::TxState,
) -> pb::TransactionInfo {
    eventually_async(&format!("{gtid} {state:?}"), || async {
        client.get(gtid).await.is_ok_and(|i| i.state() == state)
    })
    .await;
    client.get(gtid).await.expect("get")
}

// The back-check is down until the message is STUCK, undecided; the
// coordinator is killed and restarted: still STUCK and undecided (never
// presumed). `resolve --branch 2` is refused; the check comes back and
// `tandem tx retry` checks back again after the restart: delivered once.
#[tokio::test]
async fn a_stuck_undecided_message_survives_a_restart_and_retry_delivers_it() {
    let inbox = Arc::new(Inbox::default());
    let pa = spawn(ParticipantServer::new().message("inbox", inbox.clone())).await;
    let check_addr = free_addr();
    let dir = tempfile::tempdir().expect("dir");
    let args = [
        "--retry-max-attempts",
        "2",
        "--retry-initial",
        "10ms",
        "--retry-max",
        "50ms",
    ];
    let serve = Serve::start_with(dir.path(), &args, &[]);
    let listen = serve.addr().to_string();
    let client = TransactionClient::connect(serve.url.clone())
        .await
        .expect("connect");
    let gtid = Gtid::now_v7();
    client
        .prepare_message(
            gtid,
            Branch::new(format!("http://{check_addr}"), "orders", ""),
            vec![Branch::new(pa.url(), "inbox", "sms")],
            Some(Duration::from_millis(200)),
        )
        .await
        .expect("prepare");
    let info = reaches(&client, gtid, pb::TxState::Stuck).await;
    assert_eq!(info.decision(), pb::Decision::None);
    serve.kill();
    let serve = Serve::start_on(dir.path(), &listen, &args, &[]);
    let url = serve.url.clone();
    let client = TransactionClient::connect(url.clone())
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = client.get(gtid).await.expect("get");
    assert_eq!(
        (info.state(), info.decision()),
        (pb::TxState::Stuck, pb::Decision::None),
        "STUCK and undecided across the restart"
    );
    let g = gtid.to_string();
    let wrong = tandem(&[
        "tx",
        "resolve",
        &g,
        "--branch",
        "2",
        "--as",
        "committed",
        "--reason",
        "x",
        "--coordinator",
        &url,
    ]);
    assert!(!wrong.ok, "{}", wrong.stdout);
    assert!(wrong.stderr.contains("branch 1"), "{}", wrong.stderr);

    // The check is back.
    let _checks = ParticipantServer::new()
        .check("orders", Committed)
        .spawn(check_addr.parse().expect("addr"))
        .await
        .expect("check");
    let retried = tandem(&["tx", "retry", &g, "--coordinator", &url]);
    assert!(retried.ok, "{}", retried.stderr);
    reaches(&client, gtid, pb::TxState::Committed).await;
    assert_eq!(inbox.applied(gtid), 1);
    drop(serve);
}

// `tandem tx retry` of a 2PC / TCC transaction within its deadline is
// refused ("undecided and within its deadline"). For a message it sends
// the back-check at once, before the deadline the business service asked
// for: with `PgMessages` that check writes the 'not committed' row, so a
// message whose local transaction is about to run (its PrepareMessage
// just answered, deadline 30 s away) is dropped and that local
// transaction then fails. An operator retrying "everything not finished"
// kills healthy orders.
#[tokio::test]
async fn retry_before_the_deadline_does_not_check_back_early() {
    let pg = PgServer::start();
    pg.create_database("shop").await;
    let messages = PgMessages::open(pg.pool("shop")).await.expect("messages");
    let checks = spawn(ParticipantServer::new().check("orders", messages)).await;
    let inbox = Arc::new(Inbox::default());
    let pa = spawn(ParticipantServer::new().message("inbox", inbox.clone())).await;
    let dir = tempfile::tempdir().expect("dir");
    let log = Arc::new(SledLog::open(dir.path()).expect("log"));
    let coord = RunningCoordinator::start(test_config(), log)
        .await
        .expect("coordinator");
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let gtid = Gtid::now_v7();
    client
        .prepare_message(
            gtid,
            Branch::new(checks.url(), "orders", ""),
            vec![Branch::new(pa.url(), "inbox", "sms")],
            Some(Duration::from_secs(30)),
        )
        .await
        .expect("prepare");
    let mut admin = AdminClient::connect(coord.url()).await.expect("admin");
    let retried = admin
        .retry_transaction(pb::RetryTransactionRequest {
            gtid: gtid.to_string(),
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = client.get(gtid).await.expect("get");
    assert_eq!(
        info.state(),
        pb::TxState::Preparing,
        "an operator's retry within the deadline decided the message (retry answered {:?}; \
         abort: {:?})",
        retried.map(|r| r.into_inner().state()),
        info.abort
    );
}
