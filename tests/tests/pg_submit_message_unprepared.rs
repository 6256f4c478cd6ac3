//! SubmitMessage of a gtid never prepared, on a shared PostgreSQL store
//! (a client-role call): ABORTED, and ABORTED again when repeated.

use tandem_sdk::{Error, TransactionClient};
use tandem_tests::pg::PgServer;
use tandem_tests::process::Serve;

// The first SubmitMessage of a never-prepared gtid writes a presumed-abort
// row and answers ABORTED ("never prepared"); a repeat of the very same call
// reads that row back and answers ABORTED too (it answered INVALID_ARGUMENT
// "not a message", which PgMessages::send took for "the check delivers
// it").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_submit_message_of_never_prepared_gtid() {
    let pg = PgServer::start();
    let url = pg.create_database("marker").await;
    let sql = pg.connect("marker").await;
    let data = tempfile::tempdir().expect("dir");
    let a = Serve::start_store(data.path(), &url, "a", "127.0.0.1:0", "1s");
    let client = TransactionClient::connect(&a.url).await.expect("connect");

    let before: i64 = sql
        .query_one("SELECT count(*) FROM tandem_txns", &[])
        .await
        .expect("count")
        .get(0);
    for _ in 0..20 {
        let g = tandem_sdk::Gtid::now_v7();
        let r = client.submit_message(g).await;
        assert!(matches!(r, Err(Error::Aborted { .. })), "{r:?}");
    }
    let after: i64 = sql
        .query_one("SELECT count(*) FROM tandem_txns", &[])
        .await
        .expect("count")
        .get(0);
    eprintln!(
        "rows written by 20 SubmitMessage calls of random gtids: {}",
        after - before
    );

    let gtid = tandem_sdk::Gtid::now_v7();
    let first = client.submit_message(gtid).await;
    let second = client.submit_message(gtid).await;
    eprintln!("first: {first:?}\nsecond: {second:?}");
    assert!(
        matches!(first, Err(Error::Aborted { .. })),
        "first: {first:?}"
    );
    assert!(
        matches!(second, Err(Error::Aborted { .. })),
        "a repeat of the same SubmitMessage must answer the same (ABORTED): {second:?}"
    );
    drop(a);
}
