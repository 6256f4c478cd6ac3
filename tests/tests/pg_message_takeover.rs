//! Transactional messages on a shared PostgreSQL store: the coordinator
//! that prepared a message dies before its Submit; another instance takes
//! the message over once the first one's lease ran out and checks it back
//! (never presumes it aborted), so it is delivered exactly when the
//! business service's local transaction committed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tandem_coordinator::engine::{NewBranch, Txn};
use tandem_coordinator::log::{PgLog, PgOptions, TxnLog};
use tandem_coordinator::model::TxState;
use tandem_coordinator::server::RunningCoordinator;
use tandem_sdk::postgres::PgMessages;
use tandem_sdk::{BranchContext, Gtid, HandlerError, Message, ParticipantServer};
use tandem_tests::pg::PgServer;
use tandem_tests::{spawn, test_config};

#[derive(Default)]
struct Inbox(Mutex<HashMap<Gtid, usize>>);

impl Message for Inbox {
    async fn deliver(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        *self.0.lock().expect("lock").entry(ctx.gtid).or_default() += 1;
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn branch(endpoint: String, resource: &str) -> NewBranch {
    NewBranch {
        endpoint,
        resource: resource.into(),
        payload: Bytes::from_static(b"ship order 7"),
        mode: None,
        after: Vec::new(),
    }
}

// Two messages prepared by instance A (its record forced, as
// PrepareMessage leaves it); the local transaction of the first committed,
// the second's never ran. A dies. B takes both over and checks them back:
// the first is delivered once, the second dropped without a delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_taken_over_is_checked_back_never_presumed_aborted() {
    let pg = PgServer::start();
    let store = pg.create_database("coordinators").await;
    pg.create_database("shop").await;
    let messages = PgMessages::open(pg.pool("shop")).await.expect("messages");
    let checks = spawn(ParticipantServer::new().check("orders", messages)).await;
    let inbox = Arc::new(Inbox::default());
    let deliveries = spawn(ParticipantServer::new().message("inbox", inbox.clone())).await;

    let mut a_options = PgOptions::new(&store, "a");
    a_options.lease = Duration::from_secs(1);
    let a = PgLog::open(a_options).expect("open a");
    let (ordered, silent) = (Gtid::now_v7(), Gtid::now_v7());
    for gtid in [ordered, silent] {
        let now = now_ms();
        let (txn, _) = Txn::prepare_message(
            gtid,
            now,
            now + 500,
            branch(checks.url(), "orders"),
            vec![branch(deliveries.url(), "inbox")],
        );
        a.write(txn.record()).expect("write");
    }
    a.force().await.expect("force");
    // The first order's local transaction commits (its message row, as
    // PgMessages::send writes it); A dies before either Submit.
    let shop = pg.connect("shop").await;
    shop.execute(
        "INSERT INTO tandem_messages (gtid, committed, updated_ms) VALUES ($1, true, 0)",
        &[&ordered],
    )
    .await
    .expect("local commit");
    drop(a);

    let mut b_options = PgOptions::new(&store, "b");
    b_options.lease = Duration::from_secs(1);
    let b_log: Arc<PgLog> = Arc::new(PgLog::open(b_options).expect("open b"));
    let mut config = test_config();
    config.takeover_every = Duration::from_millis(200);
    let b = RunningCoordinator::start(config, b_log.clone())
        .await
        .expect("start b");
    let state = |gtid: Gtid| b_log.get(&gtid).expect("read").map(|r| r.state);
    let started = std::time::Instant::now();
    while !(state(ordered) == Some(TxState::Committed) && state(silent) == Some(TxState::Aborted)) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not settled: {:?} {:?}",
            state(ordered),
            state(silent)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rec = b_log.get(&ordered).expect("read").expect("record");
    assert!(rec.epoch >= 2, "taken over: {rec:?}");
    let applied = inbox.0.lock().expect("lock").clone();
    assert_eq!(applied.get(&ordered), Some(&1), "delivered once");
    assert_eq!(applied.get(&silent), None, "never delivered");
    // The silent order can no longer commit: the check closed it.
    let late = shop
        .execute(
            "INSERT INTO tandem_messages (gtid, committed, updated_ms) VALUES ($1, true, 0)",
            &[&silent],
        )
        .await;
    assert!(late.is_err(), "a late local commit must fail");
    drop(b);
}
