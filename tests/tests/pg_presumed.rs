//! The presumed abort of a shared store, end to end (DESIGN.md, "One
//! forced write per transaction"): a participant's question about a gtid
//! no coordinator has written leaves an aborted row behind before it is
//! answered, so a coordinator that began the gtid can never commit it; a
//! question about an id no coordinator would make or accept leaves nothing.

use std::time::Duration;

use tandem_proto::v1 as pb;
use tandem_sdk::{Branch, Error, Mode, TransactionClient};
use tandem_tests::pg::PgServer;
use tandem_tests::process::Serve;

async fn outcome(url: &str, gtid: &str) -> i32 {
    let mut rpc = pb::coordinator_client::CoordinatorClient::connect(url.to_string())
        .await
        .expect("connect");
    rpc.get_outcome(pb::GetOutcomeRequest {
        gtid: gtid.to_string(),
    })
    .await
    .expect("get outcome")
    .into_inner()
    .outcome
}

async fn rows(
    sql: &tandem_sdk::postgres::tokio_postgres::Client,
    gtid: uuid::Uuid,
) -> Vec<(i16, uuid::Uuid)> {
    sql.query(
        "SELECT state, owner FROM tandem_txns WHERE gtid = $1",
        &[&gtid],
    )
    .await
    .expect("rows")
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_about_an_unwritten_gtid_writes_its_abort_first() {
    let pg = PgServer::start();
    let url = pg.create_database("presumed").await;
    let sql = pg.connect("presumed").await;
    let data = tempfile::tempdir().expect("dir");
    let a = Serve::start_store(data.path(), &url, "a", "127.0.0.1:0", "1s");
    let b = Serve::start_store(data.path(), &url, "b", "127.0.0.1:0", "1s");

    // A gtid a client would choose now, asked about at B before anyone
    // wrote it: ABORT, and the abort is in the store first.
    let gtid = tandem_sdk::Gtid::now_v7();
    assert_eq!(
        outcome(&b.url, &gtid.to_string()).await,
        pb::Outcome::Abort as i32
    );
    assert_eq!(
        rows(&sql, gtid).await,
        vec![(6, uuid::Uuid::nil())],
        "an aborted row owned by nobody"
    );
    // The Submit of that gtid at A is told it aborted (not a different
    // transaction), and nothing reaches its participant.
    let client = TransactionClient::connect(&a.url).await.expect("connect");
    let submitted = client
        .submit_as(
            gtid,
            Mode::TwoPhase,
            vec![Branch::new("http://127.0.0.1:9", "r", "x")],
            Some(Duration::from_secs(5)),
        )
        .await;
    assert!(
        matches!(submitted, Err(Error::Aborted { .. })),
        "a Submit of a presumed-aborted gtid: {submitted:?}"
    );

    // Ids no coordinator would run now leave no row: not a UUID v7
    // (ABORT: nobody makes or accepts one), and a v7 an hour ahead (not
    // decided yet: a coordinator with a clock that far ahead could; a row
    // for it would be the last retention removes, and would raise its
    // horizon past every new gtid).
    let not_v7 = uuid::Uuid::from_u128(0x0123_4567_89ab_4def_8123_4567_89ab_cdef);
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let ahead = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, now_s + 3600, 0));
    for (id, answer) in [(not_v7, pb::Outcome::Abort), (ahead, pb::Outcome::Pending)] {
        assert_eq!(
            outcome(&b.url, &id.to_string()).await,
            answer as i32,
            "{id}"
        );
        assert!(rows(&sql, id).await.is_empty(), "{id}: a row was written");
    }
    drop((a, b));
}
