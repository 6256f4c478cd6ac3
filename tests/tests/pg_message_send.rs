//! `PgMessages::send` on PostgreSQL: the local transaction and the
//! message never disagree — a transaction PostgreSQL aborted under a
//! statement `local` ignored is not taken for a commit, an operator cannot
//! drop a message whose local transaction may still commit, and a gtid
//! presumed aborted on a shared store is never prepared.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_coordinator::log::SledLog;
use tandem_coordinator::server::RunningCoordinator;
use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_client::AdminClient;
use tandem_sdk::postgres::{MessageError, PgMessages};
use tandem_sdk::{
    Branch, BranchContext, Gtid, HandlerError, Message, ParticipantServer, TransactionClient,
};
use tandem_tests::pg::PgServer;
use tandem_tests::{spawn, test_config};

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

struct World {
    pg: PgServer,
    messages: PgMessages,
    _checks: tandem_sdk::RunningParticipant,
    check: Branch,
    inbox: Arc<Inbox>,
    pa: tandem_sdk::RunningParticipant,
    coord: RunningCoordinator,
    _dir: tempfile::TempDir,
    client: TransactionClient,
}

async fn world() -> World {
    let pg = PgServer::start();
    pg.create_database("shop").await;
    let messages = PgMessages::open(pg.pool("shop")).await.expect("messages");
    let sql = pg.connect("shop").await;
    sql.batch_execute("CREATE TABLE orders (id bigserial PRIMARY KEY, item text UNIQUE)")
        .await
        .expect("orders");
    let checks = spawn(ParticipantServer::new().check("orders", messages.clone())).await;
    let check = Branch::new(checks.url(), "orders", "");
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
    World {
        pg,
        messages,
        _checks: checks,
        check,
        inbox,
        pa,
        coord,
        _dir: dir,
        client,
    }
}

async fn count(pg: &PgServer, sql: &str, gtid: Option<Gtid>) -> i64 {
    let c = pg.connect("shop").await;
    match gtid {
        Some(g) => c.query_one(sql, &[&g]).await.expect("count").get(0),
        None => c.query_one(sql, &[]).await.expect("count").get(0),
    }
}

// The local closure tolerates a failed statement (an optional audit row,
// its error ignored) and returns Ok. PostgreSQL has then aborted the
// transaction, and answers its COMMIT with a rollback that tokio-postgres
// reports as success: `send` must find out (it reads the message's row
// before committing), answer an error and drop the message.
#[tokio::test]
async fn a_local_transaction_postgres_aborted_is_not_taken_for_a_commit() {
    let w = world().await;
    let sent = w
        .messages
        .send(
            &w.client,
            w.check.clone(),
            vec![Branch::new(w.pa.url(), "inbox", "sms")],
            Some(Duration::from_secs(30)),
            |tx| {
                Box::pin(async move {
                    tx.execute("INSERT INTO orders (item) VALUES ('book')", &[])
                        .await
                        .map_err(|e| HandlerError::new(e.to_string()))?;
                    // Best effort, error ignored (e.g. an audit row).
                    let _ = tx.execute("SELECT 1/0", &[]).await;
                    Ok(())
                })
            },
        )
        .await;
    let Err(e) = sent else {
        panic!("send answered {sent:?} though the local transaction did not commit");
    };
    assert!(matches!(e, MessageError::Database { .. }), "{e}");
    let gtid = e.gtid();
    assert_eq!(count(&w.pg, "SELECT count(*) FROM orders", None).await, 0);
    reaches(&w.client, gtid, pb::TxState::Aborted).await;
    assert_eq!(w.inbox.applied(gtid), 0);
}

// An operator aborts a message within its deadline while its local
// transaction runs: refused (FAILED_PRECONDITION), since nothing would
// stop the local transaction from committing; `send` then answers Ok and
// the message is delivered once.
#[tokio::test]
async fn an_operator_cannot_drop_a_message_whose_local_transaction_runs() {
    let w = world().await;
    let (gtid_tx, gtid_rx) = tokio::sync::oneshot::channel::<Gtid>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let url = w.coord.url();
    let operator = tokio::spawn(async move {
        let gtid = gtid_rx.await.expect("gtid");
        let mut admin = AdminClient::connect(url).await.expect("admin");
        let r = admin
            .abort_transaction(pb::AbortTransactionRequest {
                gtid: gtid.to_string(),
                reason: "looked abandoned".into(),
            })
            .await;
        let _ = go_tx.send(());
        r.map(|r| r.into_inner().state())
    });
    let sent = w
        .messages
        .send(
            &w.client,
            w.check.clone(),
            vec![Branch::new(w.pa.url(), "inbox", "sms")],
            Some(Duration::from_secs(30)),
            move |tx| {
                Box::pin(async move {
                    tx.execute("INSERT INTO orders (item) VALUES ('book')", &[])
                        .await
                        .map_err(|e| HandlerError::new(e.to_string()))?;
                    let gtid: Gtid = tx
                        .query_one("SELECT gtid FROM tandem_messages LIMIT 1", &[])
                        .await
                        .map_err(|e| HandlerError::new(e.to_string()))?
                        .get(0);
                    let _ = gtid_tx.send(gtid);
                    let _ = go_rx.await;
                    Ok(())
                })
            },
        )
        .await;
    let aborted = operator.await.expect("operator");
    let Err(status) = &aborted else {
        panic!("the operator's abort was accepted: {aborted:?}");
    };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("back-check"), "{status:?}");
    let (gtid, ()) = sent.expect("sent");
    assert_eq!(count(&w.pg, "SELECT count(*) FROM orders", None).await, 1);
    reaches(&w.client, gtid, pb::TxState::Committed).await;
    assert_eq!(w.inbox.applied(gtid), 1);
}

async fn reaches(client: &TransactionClient, gtid: Gtid, state: pb::TxState) {
    for _ in 0..200 {
        if client.get(gtid).await.expect("get").state() == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let last = client.get(gtid).await.expect("get");
    panic!("{gtid} never reached {state:?}: {last:?}");
}

// On a shared store a question about a gtid nobody wrote yet leaves a
// presumed-abort row (GetOutcome). A PrepareMessage of that gtid is told
// ABORTED (its business service must not commit), as a 2PC Submit of such
// a gtid is (tests/pg_presumed.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gtid_presumed_aborted_is_not_prepared() {
    use tandem_tests::process::Serve;
    let pg = PgServer::start();
    let url = pg.create_database("presumed").await;
    let data = tempfile::tempdir().expect("dir");
    let a = Serve::start_store(data.path(), &url, "a", "127.0.0.1:0", "1s");
    let b = Serve::start_store(data.path(), &url, "b", "127.0.0.1:0", "1s");
    let gtid = Gtid::now_v7();
    let mut rpc = pb::coordinator_client::CoordinatorClient::connect(b.url.clone())
        .await
        .expect("connect");
    let outcome = rpc
        .get_outcome(pb::GetOutcomeRequest {
            gtid: gtid.to_string(),
        })
        .await
        .expect("outcome")
        .into_inner()
        .outcome;
    assert_eq!(outcome, pb::Outcome::Abort as i32);
    let client = TransactionClient::connect(&a.url).await.expect("connect");
    let prepared = client
        .prepare_message(
            gtid,
            Branch::new("http://127.0.0.1:9", "orders", ""),
            vec![Branch::new("http://127.0.0.1:9", "inbox", "sms")],
            Some(Duration::from_secs(30)),
        )
        .await;
    assert!(
        matches!(prepared, Err(tandem_sdk::Error::Aborted { .. })),
        "PrepareMessage of a presumed-aborted gtid answered {prepared:?}"
    );
    let submitted = client.submit_message(gtid).await;
    assert!(submitted.is_err(), "{submitted:?}");
    drop((a, b));
}

// A message whose local transaction committed and whose Submit never
// came, checked back only after a purge removed its row (STUCK for longer
// than rows are kept): the check does not answer "not committed" (the
// message would be dropped for a committed order); it fails, naming the
// purge, and is asked again until the message is STUCK, undecided, for an
// operator.
#[tokio::test]
async fn a_check_after_its_row_was_purged_does_not_drop_the_message() {
    let w = world().await;
    let gtid = Gtid::now_v7();
    // The local transaction's row, committed; then retention removes it.
    let sql = w.pg.connect("shop").await;
    sql.execute(
        "INSERT INTO tandem_messages (gtid, committed, updated_ms) VALUES ($1, true, 1)",
        &[&gtid],
    )
    .await
    .expect("row");
    let purged = w
        .messages
        .purge_older_than(Duration::from_secs(1))
        .await
        .expect("purge");
    assert_eq!(purged, 1);
    w.client
        .prepare_message(
            gtid,
            w.check.clone(),
            vec![Branch::new(w.pa.url(), "inbox", "sms")],
            Some(Duration::from_millis(100)),
        )
        .await
        .expect("prepare");
    let mut info = w.client.get(gtid).await.expect("get");
    for _ in 0..200 {
        if info.branches[0].attempts >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        info = w.client.get(gtid).await.expect("get");
    }
    assert!(info.branches[0].attempts >= 3, "{info:?}");
    assert_eq!(info.decision(), pb::Decision::None, "never presumed");
    assert!(
        info.branches[0].last_error.contains("purged"),
        "{:?}",
        info.branches[0]
    );
    assert_eq!(
        count(
            &w.pg,
            "SELECT count(*) FROM tandem_messages WHERE gtid = $1",
            Some(gtid)
        )
        .await,
        0,
        "the check closed the message"
    );
    // A message newer than the purge is still answered from its row, or
    // closed when there is none.
    let (fresh, ()) = w
        .messages
        .send(
            &w.client,
            w.check.clone(),
            vec![Branch::new(w.pa.url(), "inbox", "sms")],
            None,
            |_| Box::pin(async { Ok(()) }),
        )
        .await
        .expect("send");
    reaches(&w.client, fresh, pb::TxState::Committed).await;
    assert_eq!(w.inbox.applied(fresh), 1);
    assert_eq!(w.inbox.applied(gtid), 0);
}
