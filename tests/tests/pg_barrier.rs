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
    for i in 0..12 {
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

// The two-handle cases, on two stores with a pool each on one database,
// as two replicas of a participant (two processes) have them: the gate's
// serialisation holds across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_barrier_replicas_pass_the_shared_conformance_suite() {
    let pg = PgServer::start();
    let mut pairs = Vec::new();
    for i in 0..3 {
        let db = format!("shared_{i}");
        pg.create_database(&db).await;
        let one = PgBarrier::open(pg.pool(&db)).await.expect("open");
        let two = PgBarrier::open(pg.pool(&db)).await.expect("open");
        pairs.push((one, two));
    }
    let pairs = std::sync::Mutex::new(pairs);
    conformance::run_shared(|| pairs.lock().expect("pairs").pop().expect("a pair per case")).await;
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

// Rule: the branch lock holds across processes. Two stores on one
// database (as two replicas of a participant are) never hold a branch at
// once: the second waits, then reads what the first wrote; other branches
// do not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_database_serialise_a_branch() {
    let pg = PgServer::start();
    pg.create_database("shared").await;
    let one = PgBarrier::open(pg.pool("shared")).await.expect("open");
    let two = PgBarrier::open(pg.pool("shared")).await.expect("open");
    let key = conformance::key(1, 1);
    let mut first = one.enter(key).await.expect("enter");
    assert_eq!(first.record(), None);
    let waiting = tokio::spawn({
        let two = two.clone();
        async move {
            let entry = two.enter(key).await.expect("enter");
            entry.record().map(|r| r.mark)
        }
    });
    let other = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        two.enter(conformance::key(1, 2)),
    )
    .await;
    assert!(matches!(other, Ok(Ok(_))), "another branch waited");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the second store entered a branch the first holds"
    );
    first.put(Mark::EmptyCancelled, 1).await.expect("put");
    drop(first);
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("the second store never got the branch")
        .expect("task");
    assert_eq!(seen, Some(Mark::EmptyCancelled));
}

// A record is written only over the mark read under the branch's lock:
// one changed behind the entry's back (a writer not taking the lock) is
// not overwritten, the write fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_changed_behind_the_lock_is_not_overwritten() {
    let pg = PgServer::start();
    pg.create_database("cas").await;
    let barrier = PgBarrier::open(pg.pool("cas")).await.expect("open");
    let key = conformance::key(2, 1);
    let mut entry = barrier.enter(key).await.expect("enter");
    entry.put_tried("r", b"p", 1).await.expect("tried");
    pg.connect("cas")
        .await
        .execute(
            "UPDATE tandem_barrier SET mark = 4 WHERE gtid = $1",
            &[&key.gtid],
        )
        .await
        .expect("behind the lock");
    assert!(entry.put(Mark::Refused, 1).await.is_err());
    drop(entry);
    assert_eq!(
        barrier
            .enter(key)
            .await
            .expect("enter")
            .record()
            .map(|r| r.mark),
        Some(Mark::Cancelled)
    );
}

// Inside a call, the handler's transaction runs on the connection holding
// the branch's lock: dropped half-way it is rolled back before the call's
// record is written on that connection, and a second transaction while
// the first is open is refused rather than waiting for itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_transaction_inside_a_call_shares_the_locked_connection() {
    let pg = PgServer::start();
    pg.create_database("inside").await;
    let barrier = PgBarrier::open(postgres::pool(&pg.url("inside"), 2).expect("pool"))
        .await
        .expect("open");
    barrier
        .pool()
        .get()
        .await
        .expect("conn")
        .batch_execute("CREATE TABLE scratch (v int)")
        .await
        .expect("create");
    let ctx = BranchContext {
        gtid: Gtid::now_v7(),
        branch_id: 1,
        resource: "r".into(),
        attempt: 1,
        phase: Phase::Cancel,
        epoch: 1,
        traceparent: None,
    };
    let mut entry = barrier.enter(ctx.key()).await.expect("enter");
    entry.put_tried("r", b"", 1).await.expect("tried");
    {
        let tx = barrier.begin(&ctx).await.expect("begin");
        tx.execute("INSERT INTO scratch VALUES (1)", &[])
            .await
            .expect("insert");
        assert!(
            barrier.begin(&ctx).await.is_err(),
            "a second transaction of the call"
        );
        // dropped here, as by an early return
    }
    entry
        .put(Mark::Cancelled, 1)
        .await
        .expect("put after rollback");
    drop(entry);
    assert_eq!(scratch_values(&pg, "inside").await, Vec::<i32>::new());
    assert_eq!(mark(&barrier, &ctx).await, Some(Mark::Cancelled));
}
