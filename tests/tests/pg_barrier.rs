//! The PostgreSQL barrier store against a real server started by the test.

use tandem_sdk::barrier::{BarrierStore, Mark, conformance};
use tandem_sdk::postgres::{self, PgBarrier};
use tandem_sdk::{BranchContext, Gtid, Phase};
use tandem_tests::pg::PgServer;

// The BarrierStore contract, on PostgreSQL: each case on its own database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_barrier_passes_the_conformance_suite() {
    let pg = PgServer::start();
    let mut stores = Vec::new();
    for i in 0..10 {
        let db = format!("conformance_{i}");
        pg.create_database(&db).await;
        stores.push(PgBarrier::open(pg.pool(&db)).await.expect("open"));
    }
    let stores = std::sync::Mutex::new(stores);
    conformance::run_all(|| {
        stores
            .lock()
            .expect("stores")
            .pop()
            .expect("a store per case")
    })
    .await;
}

async fn scratch_values(pg: &PgServer, db: &str) -> Vec<i32> {
    pg.connect(db)
        .await
        .query("SELECT v FROM scratch ORDER BY v", &[])
        .await
        .expect("select")
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

async fn mark(barrier: &PgBarrier, ctx: &BranchContext) -> Option<Mark> {
    barrier
        .enter(ctx.key())
        .await
        .expect("enter")
        .record()
        .map(|r| r.mark)
}

// A BranchTx commits the handler's SQL and the call's barrier record
// together; dropped half-way (an early `?`) it applies neither, and the
// pool's next connection is not inside the abandoned transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_transaction_commits_the_record_with_the_change_or_nothing() {
    let pg = PgServer::start();
    pg.create_database("tx").await;
    let barrier = PgBarrier::open(postgres::pool(&pg.url("tx"), 1).expect("pool"))
        .await
        .expect("open");
    let conn = barrier.pool().get().await.expect("conn");
    conn.batch_execute("CREATE TABLE scratch (v int)")
        .await
        .expect("create");
    drop(conn);
    let ctx = |branch_id| BranchContext {
        gtid: Gtid::now_v7(),
        branch_id,
        resource: "r".into(),
        attempt: 1,
        phase: Phase::Confirm,
        epoch: 1,
        traceparent: None,
    };
    let (dropped, committed) = (ctx(1), ctx(2));
    for c in [&dropped, &committed] {
        let mut entry = barrier.enter(c.key()).await.expect("enter");
        entry.put_tried("r", b"", 1).await.expect("tried");
    }

    {
        let tx = barrier.begin(&dropped).await.expect("begin");
        tx.execute("INSERT INTO scratch VALUES (1)", &[])
            .await
            .expect("insert");
        // dropped here, as by an early return
    }
    let tx = barrier
        .begin(&committed)
        .await
        .expect("begin on a clean connection");
    tx.execute("INSERT INTO scratch VALUES (2)", &[])
        .await
        .expect("insert");
    tx.commit().await.expect("commit");

    assert_eq!(scratch_values(&pg, "tx").await, vec![2]);
    assert_eq!(
        mark(&barrier, &dropped).await,
        Some(Mark::Tried),
        "nothing recorded"
    );
    assert_eq!(
        mark(&barrier, &committed).await,
        Some(Mark::Confirmed),
        "recorded with the change"
    );
}

// A barrier table made before records had an epoch gets the column when
// the store opens: old rows read as epoch 0, new writes keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_barrier_table_gains_the_epoch_column() {
    let pg = PgServer::start();
    pg.create_database("old").await;
    let gtid = Gtid::now_v7();
    pg.connect("old")
        .await
        .batch_execute(&format!(
            "CREATE TABLE tandem_barrier (
                gtid uuid NOT NULL, branch_id bigint NOT NULL, mark smallint NOT NULL,
                updated_ms bigint NOT NULL, resource text, payload bytea,
                PRIMARY KEY (gtid, branch_id));
             INSERT INTO tandem_barrier VALUES ('{gtid}', 1, 3, 1, NULL, NULL);"
        ))
        .await
        .expect("old schema");
    let barrier = PgBarrier::open(pg.pool("old")).await.expect("open");
    let key = tandem_sdk::barrier::BranchKey { gtid, branch_id: 1 };
    let mut entry = barrier.enter(key).await.expect("enter");
    let old = entry.record().expect("old row");
    assert_eq!((old.mark, old.epoch), (Mark::Confirmed, 0));
    entry.put(Mark::Confirmed, 4).await.expect("put");
    drop(entry);
    let entry = barrier.enter(key).await.expect("enter");
    assert_eq!(entry.record().map(|r| r.epoch), Some(4));
}

// Opening the store again (a participant restart) does not wait for a
// prepared transaction that read the barrier table: only the restarted
// participant would finish it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_does_not_wait_for_prepared_transactions() {
    let pg = PgServer::start();
    pg.create_database("held").await;
    PgBarrier::open(pg.pool("held")).await.expect("first open");
    let conn = pg.connect("held").await;
    conn.batch_execute(
        "BEGIN; SELECT count(*) FROM tandem_barrier; PREPARE TRANSACTION 'tandem-test-held'",
    )
    .await
    .expect("prepare");
    let reopened = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        PgBarrier::open(pg.pool("held")),
    )
    .await;
    conn.batch_execute("ROLLBACK PREPARED 'tandem-test-held'")
        .await
        .expect("rollback prepared");
    reopened
        .expect("open waited for the prepared transaction")
        .expect("open");
}
