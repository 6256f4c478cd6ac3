//! The PostgreSQL barrier store against a real server started by the test.

use tandem_sdk::barrier::conformance;
use tandem_sdk::postgres::PgBarrier;
use tandem_tests::pg::PgServer;

// The BarrierStore contract, on PostgreSQL: each case on its own database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_barrier_passes_the_conformance_suite() {
    let pg = PgServer::start();
    let mut stores = Vec::new();
    for i in 0..7 {
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
