//! Takeover on a shared PostgreSQL store when the store does not answer the
//! new owner's first read: the transaction is still driven to its end,
//! with no request reaching the owner (issue 22, finding 3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_coordinator::log::{PgLog, PgOptions, TxnLog, conformance};
use tandem_coordinator::model::Mode;
use tandem_coordinator::server::RunningCoordinator;
use tandem_tests::pg::PgServer;
use tandem_tests::{Scripted, test_config};

// A dies with an undecided transaction whose payload is stored apart; B
// claims it once A's lease has run out, while another session holds the
// payload table locked for 3 s, longer than B's 0.8 s store timeout, so
// B's read of the record it just claimed fails. The row is B's (epoch 2,
// B's lease live), so no other instance may take it: B itself must keep
// trying, and abort it once the store answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_whose_first_read_fails_is_driven() {
    let pg = PgServer::start();
    let url = pg.create_database("reclaim").await;
    let sql = pg.connect("reclaim").await;
    let participant = Scripted::yes("p");
    let served = participant.serve().await;

    let mut b_options = PgOptions::new(&url, "b");
    b_options.lease = Duration::from_secs(1);
    b_options.store_timeout = Duration::from_millis(800);
    let b_log: Arc<dyn TxnLog> = Arc::new(PgLog::open(b_options).expect("open b"));
    let mut config = test_config();
    config.takeover_every = Duration::from_millis(200);
    let b = RunningCoordinator::start(config, b_log)
        .await
        .expect("start b");

    let mut a_options = PgOptions::new(&url, "a");
    a_options.lease = Duration::from_secs(1);
    let a = PgLog::open(a_options).expect("open a");
    let mut rec = conformance::sample_record(Mode::TwoPhase, 1);
    rec.branches[0].endpoint = served.url();
    rec.branches[0].resource = "r".into();
    rec.branches[0].payload = bytes::Bytes::from(vec![7u8; 4096]);
    a.write(&rec).expect("write");
    a.force().await.expect("force");

    let locker = pg.connect("reclaim").await;
    locker
        .batch_execute("BEGIN; LOCK TABLE tandem_payloads IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the payloads");
    let locked_at = Instant::now();
    // A dies: its lease runs out within a second, and B claims the row.
    drop(a);
    let row = |gtid: uuid::Uuid| {
        let sql = &sql;
        async move {
            let r = sql
                .query_one(
                    "SELECT state, epoch FROM tandem_txns WHERE gtid = $1",
                    &[&gtid],
                )
                .await
                .expect("row");
            (r.get::<_, i16>(0), r.get::<_, i64>(1))
        }
    };
    while row(rec.gtid).await.1 < 2 {
        assert!(locked_at.elapsed() < Duration::from_secs(2), "no takeover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B's read of it waits on the lock past B's store timeout.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(locked_at.elapsed())).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(row(rec.gtid).await, (2, 2), "PREPARING, claimed by B");
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    let released = Instant::now();

    // No request reaches B: it finishes the transaction on its own.
    while row(rec.gtid).await.0 != 6 {
        assert!(
            released.elapsed() < Duration::from_secs(15),
            "B never drove the transaction it owns: {:?}",
            row(rec.gtid).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "aborted {} ms after the store answered again",
        released.elapsed().as_millis()
    );
    drop(b);
}
