//! Transactional messages end to end: a coordinator (in this process, or a
//! `tandem serve` process that is killed), delivery participants and the
//! business service's back-check on loopback (real tonic servers), and
//! for the back-check's rows a real PostgreSQL server. A message is
//! delivered once its local transaction committed (by Submit, or by the
//! back-check when the Submit never came) and never otherwise; each
//! delivery is applied once however often it arrives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_coordinator::config::CoordinatorConfig;
use tandem_coordinator::log::SledLog;
use tandem_coordinator::server::RunningCoordinator;
use tandem_proto::v1 as pb;
use tandem_proto::v1::admin_client::AdminClient;
use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_sdk::postgres::PgMessages;
use tandem_sdk::{
    Branch, BranchContext, Error, Gtid, HandlerError, Message, MessageCheck, Mode,
    ParticipantServer, RunningParticipant, TransactionClient,
};
use tandem_tests::pg::PgServer;
use tandem_tests::process::{Serve, free_addr};
use tandem_tests::{eventually_async, spawn, test_config};

/// A delivery participant: counts what it applied per message, and fails
/// the first `failures` deliveries.
#[derive(Default)]
struct Inbox {
    applied: Mutex<HashMap<Gtid, usize>>,
    failures: AtomicUsize,
    calls: AtomicUsize,
}

impl Inbox {
    fn applied(&self, gtid: Gtid) -> usize {
        self.applied
            .lock()
            .expect("lock")
            .get(&gtid)
            .copied()
            .unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.applied.lock().expect("lock").values().sum()
    }
}

impl Message for Inbox {
    async fn deliver(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(HandlerError::new("inbox briefly down"));
        }
        // Slow enough that concurrent repeats overlap.
        tokio::time::sleep(Duration::from_millis(20)).await;
        *self
            .applied
            .lock()
            .expect("lock")
            .entry(ctx.gtid)
            .or_default() += 1;
        Ok(())
    }
}

/// A back-check whose answer the test sets: `None` fails the check (not
/// known yet).
#[derive(Default)]
struct Answer(Mutex<Option<bool>>, AtomicUsize);

impl MessageCheck for Answer {
    async fn check(&self, _ctx: &BranchContext, _payload: &[u8]) -> Result<bool, HandlerError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        (*self.0.lock().expect("lock")).ok_or_else(|| HandlerError::new("orders db unreachable"))
    }
}

async fn inbox() -> (Arc<Inbox>, RunningParticipant) {
    let inbox = Arc::new(Inbox::default());
    let running = spawn(ParticipantServer::new().message("inbox", inbox.clone())).await;
    (inbox, running)
}

fn delivery(p: &RunningParticipant, payload: &str) -> Branch {
    Branch::new(p.url(), "inbox", payload.to_string())
}

async fn coordinator(config: CoordinatorConfig) -> (RunningCoordinator, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let log = Arc::new(SledLog::open(dir.path()).expect("log"));
    let coord = RunningCoordinator::start(config, log)
        .await
        .expect("coordinator");
    (coord, dir)
}

async fn client(url: &str) -> TransactionClient {
    TransactionClient::connect(url).await.expect("connect")
}

async fn reaches(
    client: &TransactionClient,
    gtid: Gtid,
    state: pb::TxState,
) -> pb::TransactionInfo {
    eventually_async(&format!("{gtid} {state:?}"), || async {
        client
            .get(gtid)
            .await
            .is_ok_and(|info| info.state() == state)
    })
    .await;
    client.get(gtid).await.expect("get")
}

// Submit after the local commit: delivered to every branch once (the first
// delivery of one branch fails and is retried), a repeated Submit changes
// nothing, and the record shows the mode and each branch's end.
#[tokio::test]
async fn a_submitted_message_is_delivered_to_every_branch_once() {
    let (coord, _dir) = coordinator(test_config()).await;
    let (a, pa) = inbox().await;
    let (b, pb_) = inbox().await;
    b.failures.store(1, Ordering::SeqCst);
    let checks = Arc::new(Answer::default());
    let business = spawn(ParticipantServer::new().check("orders", checks.clone())).await;
    let client = client(&coord.url()).await;
    let gtid = Gtid::now_v7();
    let check = Branch::new(business.url(), "orders", "");
    client
        .prepare_message(
            gtid,
            check.clone(),
            vec![delivery(&pa, "sms"), delivery(&pb_, "email")],
            None,
        )
        .await
        .expect("prepare");
    // A repeat of the prepare answers the same message.
    client
        .prepare_message(
            gtid,
            check,
            vec![delivery(&pa, "sms"), delivery(&pb_, "email")],
            None,
        )
        .await
        .expect("repeated prepare");
    let info = client.get(gtid).await.expect("get");
    assert_eq!(info.mode(), pb::Mode::Msg);
    assert_eq!(info.state(), pb::TxState::Preparing);
    assert_eq!((a.total(), b.total()), (0, 0), "nothing before the submit");

    client.submit_message(gtid).await.expect("submit");
    let info = reaches(&client, gtid, pb::TxState::Committed).await;
    assert_eq!(info.branches.len(), 3);
    assert_eq!((a.applied(gtid), b.applied(gtid)), (1, 1));
    assert_eq!(
        b.calls.load(Ordering::SeqCst),
        2,
        "the failed delivery was retried"
    );
    client.submit_message(gtid).await.expect("repeated submit");
    assert_eq!((a.applied(gtid), b.applied(gtid)), (1, 1));
    assert_eq!(checks.1.load(Ordering::SeqCst), 0, "never checked back");
}

// The business service's local transaction failed: Rollback drops the
// message at once, nothing is delivered, and a late Submit is refused.
#[tokio::test]
async fn a_rolled_back_message_is_never_delivered() {
    let (coord, _dir) = coordinator(test_config()).await;
    let (a, pa) = inbox().await;
    let business = spawn(ParticipantServer::new().check("orders", Answer::default())).await;
    let client = client(&coord.url()).await;
    let gtid = Gtid::now_v7();
    client
        .prepare_message(
            gtid,
            Branch::new(business.url(), "orders", ""),
            vec![delivery(&pa, "sms")],
            None,
        )
        .await
        .expect("prepare");
    client
        .rollback(gtid, "order rejected")
        .await
        .expect("rollback");
    reaches(&client, gtid, pb::TxState::Aborted).await;
    // Dropped: a late Submit is told so (ABORTED), and so is a repeated
    // prepare (its business service must not commit on it).
    let late = client.submit_message(gtid).await;
    assert!(matches!(late, Err(Error::Aborted { .. })), "{late:?}");
    let again = client
        .prepare_message(
            gtid,
            Branch::new(business.url(), "orders", ""),
            vec![delivery(&pa, "sms")],
            None,
        )
        .await;
    assert!(matches!(again, Err(Error::Aborted { .. })), "{again:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.total(), 0);
}

// A message is one thing; it does not mix: Begin or Submit in MODE_MSG,
// a message branch in another transaction, a message with no delivery,
// or SubmitMessage of a transaction that is not a message: all refused,
// nothing recorded.
#[tokio::test]
async fn messages_do_not_mix_with_other_modes() {
    let (coord, _dir) = coordinator(test_config()).await;
    let (_a, pa) = inbox().await;
    let client = client(&coord.url()).await;
    let invalid = |r: Result<_, Error>| {
        let Err(Error::Invalid { code, message }) = r else {
            panic!("not refused: {:?}", r.map(|_| ()));
        };
        assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
        message
    };
    let why = invalid(client.begin(Mode::Msg).await.map(drop));
    assert!(why.contains("PrepareMessage"), "{why}");
    invalid(
        client
            .submit(Mode::Msg, vec![delivery(&pa, "x")])
            .await
            .map(drop),
    );
    let mut msg_branch = delivery(&pa, "x");
    msg_branch.mode = Some(Mode::Msg);
    invalid(client.submit(Mode::Tcc, vec![msg_branch]).await.map(drop));
    invalid(
        client
            .prepare_message(
                Gtid::now_v7(),
                Branch::new(pa.url(), "orders", ""),
                Vec::new(),
                None,
            )
            .await
            .map(drop),
    );
    let mut tcc = delivery(&pa, "x");
    tcc.mode = Some(Mode::Tcc);
    invalid(
        client
            .prepare_message(
                Gtid::now_v7(),
                Branch::new(pa.url(), "orders", ""),
                vec![tcc],
                None,
            )
            .await
            .map(drop),
    );
}

// The back-check cannot be reached (its service is down): asked again
// with backoff, then the message is STUCK, undecided, with the error on
// branch 1; nothing is delivered or dropped on a guess. The operator
// settles the local transaction as committed (`tandem tx resolve
// --branch 1 --commit`) and the deliveries follow.
#[tokio::test]
async fn an_unreachable_back_check_is_retried_then_stuck_then_resolved() {
    let mut config = test_config();
    config.retry.max_attempts = Some(3);
    let (coord, _dir) = coordinator(config).await;
    let (a, pa) = inbox().await;
    let client = client(&coord.url()).await;
    let gtid = Gtid::now_v7();
    let down = format!("http://{}", free_addr());
    client
        .prepare_message(
            gtid,
            Branch::new(down, "orders", ""),
            vec![delivery(&pa, "sms")],
            Some(Duration::from_millis(200)),
        )
        .await
        .expect("prepare");
    let info = reaches(&client, gtid, pb::TxState::Stuck).await;
    assert_eq!(info.decision(), pb::Decision::None, "never presumed");
    let local = &info.branches[0];
    assert!(local.last_error.contains("back-check"), "{local:?}");
    assert!(local.attempts >= 3, "{local:?}");
    assert_eq!(a.total(), 0);

    let mut admin = AdminClient::connect(coord.url()).await.expect("admin");
    admin
        .resolve_branch(pb::ResolveBranchRequest {
            gtid: gtid.to_string(),
            branch_id: 1,
            outcome: pb::Decision::Commit as i32,
            reason: "the order is in the orders table".into(),
        })
        .await
        .expect("resolve");
    reaches(&client, gtid, pb::TxState::Committed).await;
    assert_eq!(a.applied(gtid), 1);
}

// Deliveries repeated and concurrent, as a coordinator that lost the
// acknowledgements (or two owners after a takeover) sends them: sixteen
// at once and more after, for two branches: each applied once.
#[tokio::test]
async fn repeated_and_concurrent_deliveries_are_applied_once() {
    let (a, pa) = inbox().await;
    let gtid = Gtid::now_v7();
    let call = |branch_id: u32| {
        let url = pa.url();
        async move {
            let mut rpc = ParticipantClient::connect(url).await.expect("connect");
            rpc.deliver(pb::BranchRequest {
                gtid: gtid.to_string(),
                branch_id,
                resource: "inbox".into(),
                payload: b"sms".to_vec().into(),
                attempt: 1,
                epoch: 1,
                mode: 0,
            })
            .await
        }
    };
    let mut calls = Vec::new();
    for i in 0..16 {
        calls.push(tokio::spawn(call(2 + i % 2)));
    }
    for c in calls {
        c.await.expect("task").expect("delivered");
    }
    call(2).await.expect("repeat");
    call(3).await.expect("repeat");
    assert_eq!(a.applied(gtid), 2, "once per branch");
    assert_eq!(
        a.calls.load(Ordering::SeqCst),
        2,
        "the handler ran once per branch"
    );
}

/// The business service on PostgreSQL: its `orders` table, its message
/// rows, and its back-check served on loopback.
struct Shop {
    _pg: PgServer,
    sql: tandem_sdk::postgres::tokio_postgres::Client,
    checks: RunningParticipant,
}

impl Shop {
    async fn new() -> Shop {
        let pg = PgServer::start();
        pg.create_database("shop").await;
        let messages = PgMessages::open(pg.pool("shop"))
            .await
            .expect("messages")
            .check_timeout(Duration::from_secs(10));
        let sql = pg.connect("shop").await;
        sql.batch_execute("CREATE TABLE orders (gtid uuid PRIMARY KEY, item text NOT NULL)")
            .await
            .expect("orders table");
        let checks = spawn(ParticipantServer::new().check("orders", messages)).await;
        Shop {
            _pg: pg,
            sql,
            checks,
        }
    }

    fn check(&self) -> Branch {
        Branch::new(self.checks.url(), "orders", "")
    }

    /// The local transaction of message `gtid`, as `PgMessages::send`
    /// runs it (its row first, then the order), left open.
    async fn begin_order(
        &mut self,
        gtid: Gtid,
    ) -> tandem_sdk::postgres::tokio_postgres::Transaction<'_> {
        let tx = self.sql.transaction().await.expect("begin");
        tx.execute(
            "INSERT INTO tandem_messages (gtid, committed, updated_ms) VALUES ($1, true, 0)",
            &[&gtid],
        )
        .await
        .expect("message row");
        tx.execute("INSERT INTO orders VALUES ($1, 'book')", &[&gtid])
            .await
            .expect("order");
        tx
    }

    async fn orders(&self) -> i64 {
        self.sql
            .query_one("SELECT count(*) FROM orders", &[])
            .await
            .expect("count")
            .get(0)
    }
}

// The business service commits its local transaction, then dies before
// its Submit; the coordinator is killed too, while the message waits, and
// restarted. At the deadline the restarted coordinator asks the back-check,
// which finds the committed row: delivered, once.
#[tokio::test]
async fn committed_then_crashed_before_submit_is_delivered_by_the_back_check() {
    let mut shop = Shop::new().await;
    let (a, pa) = inbox().await;
    let dir = tempfile::tempdir().expect("dir");
    let serve = Serve::start(dir.path());
    let listen = serve.addr().to_string();
    let client = client(&serve.url).await;
    let gtid = Gtid::now_v7();
    client
        .prepare_message(
            gtid,
            shop.check(),
            vec![delivery(&pa, "ship the book")],
            Some(Duration::from_secs(2)),
        )
        .await
        .expect("prepare");
    shop.begin_order(gtid)
        .await
        .commit()
        .await
        .expect("local commit");
    // No Submit: the business service is gone. So is the coordinator.
    serve.kill();
    let serve = Serve::start_on(dir.path(), &listen, &[], &[]);
    let client = self::client(&serve.url).await;
    reaches(&client, gtid, pb::TxState::Committed).await;
    assert_eq!(a.applied(gtid), 1);
    assert_eq!(shop.orders().await, 1);
}

// The local transaction rolled back and no Rollback came (the business
// service died): the back-check finds no row, makes sure none can
// appear, and the message is dropped; a late local commit of that order
// then fails, so no order exists without its message.
#[tokio::test]
async fn rolled_back_then_silent_is_dropped_by_the_back_check() {
    let mut shop = Shop::new().await;
    let (a, pa) = inbox().await;
    let (coord, _dir) = coordinator(test_config()).await;
    let client = client(&coord.url()).await;
    let gtid = Gtid::now_v7();
    client
        .prepare_message(
            gtid,
            shop.check(),
            vec![delivery(&pa, "ship the book")],
            Some(Duration::from_millis(300)),
        )
        .await
        .expect("prepare");
    shop.begin_order(gtid)
        .await
        .rollback()
        .await
        .expect("rollback");
    let info = reaches(&client, gtid, pb::TxState::Aborted).await;
    let abort = info.abort.expect("abort info");
    assert_eq!(abort.branch_id, 1, "{abort:?}");
    assert_eq!(a.total(), 0);
    // Too late: the check's answer stands.
    let tx = shop.sql.transaction().await.expect("begin");
    let late = tx
        .execute(
            "INSERT INTO tandem_messages (gtid, committed, updated_ms) VALUES ($1, true, 0)",
            &[&gtid],
        )
        .await;
    assert!(late.is_err(), "a late local commit must fail");
    drop(tx);
    assert_eq!(shop.orders().await, 0);
}

// The back-check arrives while the local transaction is still running
// (it holds its message row, uncommitted): the check waits for it, and
// the answer is that transaction's outcome. It commits: delivered.
#[tokio::test]
async fn a_back_check_waits_for_the_local_transaction_in_progress() {
    let mut shop = Shop::new().await;
    let (a, pa) = inbox().await;
    let mut config = test_config();
    config.call_timeout = Duration::from_secs(15);
    let (coord, _dir) = coordinator(config).await;
    let client = client(&coord.url()).await;
    let gtid = Gtid::now_v7();
    client
        .prepare_message(
            gtid,
            shop.check(),
            vec![delivery(&pa, "ship the book")],
            Some(Duration::from_millis(200)),
        )
        .await
        .expect("prepare");
    let tx = shop.begin_order(gtid).await;
    // Past the deadline: the check is out, waiting on the row.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        client.get(gtid).await.expect("get").state(),
        pb::TxState::Preparing
    );
    assert_eq!(a.total(), 0);
    tx.commit().await.expect("local commit");
    reaches(&client, gtid, pb::TxState::Committed).await;
    assert_eq!(a.applied(gtid), 1);
}

// The shop demo (`tandem demo --order`): orders reserve stock and charge a
// card by saga, confirmed orders are notified by message (some after a
// skipped Submit, by the back-check); stock, money and notifications add
// up, and it fails if one does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_demo_adds_up() {
    let report = tandem_cli::demo_order::run(200, 16).await.expect("demo");
    assert!(report.ok(), "{report}");
    assert!(
        report.confirmed > 0 && report.declined > 0 && report.checked_back > 0,
        "{report}"
    );
}
