//! `PgLog` against a real PostgreSQL: the `TxnLog` conformance suite, and
//! the checks only a shared store can answer (durability across a reopen,
//! a restart taking its predecessor's transactions over, an expired lease
//! taken over by another instance, and a fenced former owner).

use std::time::Duration;

use tandem_coordinator::log::{LogError, PgLog, PgOptions, TxnLog, conformance};
use tandem_coordinator::model::{Decision, Mode, TxState};
use tandem_tests::pg::PgServer;

fn options(url: &str, name: &str) -> PgOptions {
    let mut o = PgOptions::new(url, name);
    o.lease = Duration::from_millis(600);
    o.store_timeout = Duration::from_secs(5);
    o
}

#[tokio::test]
async fn pg_log_conforms() {
    let pg = PgServer::start();
    let mut urls = Vec::new();
    for i in 0..10 {
        urls.push(pg.create_database(&format!("conf{i}")).await);
    }
    let urls = std::sync::Mutex::new(urls);
    conformance::run_all(|| {
        let url = urls
            .lock()
            .expect("urls")
            .pop()
            .expect("a database per check");
        PgLog::open(options(&url, "conformance")).expect("open")
    })
    .await;
}

// What was forced is in the store: a new process (another incarnation of
// the same name) reads it back, and takes the unfinished one over.
#[tokio::test]
async fn forced_records_survive_and_a_restart_takes_them_over() {
    let pg = PgServer::start();
    let url = pg.create_database("reopen").await;
    let mut rec = conformance::sample_record(Mode::TwoPhase, 3);
    for b in &mut rec.branches {
        b.payload = bytes::Bytes::from(vec![b.id as u8; 4096]);
    }
    let first = PgLog::open(options(&url, "a")).expect("open");
    first.write(&rec).expect("write");
    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    first.write(&rec).expect("write");
    first.force().await.expect("force");
    let first_incarnation = first.incarnation();
    // The old process is gone without a goodbye (its lease still runs).
    std::mem::forget(first);

    let second = PgLog::open(options(&url, "a")).expect("reopen");
    assert_ne!(second.incarnation(), first_incarnation);
    // Taken over: the same record, one epoch later.
    let stale = rec.clone();
    rec.epoch = 2;
    assert_eq!(second.get(&rec.gtid).expect("get").as_ref(), Some(&rec));
    let own = second.scan_own(None, &[], 10).expect("scan own");
    assert_eq!(
        own.len(),
        1,
        "the restart owns its predecessor's transaction"
    );
    // It may write it (it is the owner now), at the epoch it read.
    rec.state = TxState::Committed;
    second.write(&rec).expect("write");
    second.force().await.expect("force by the new owner");
    // A copy from the earlier epoch is refused even from the owner: an
    // owner that lost a row and claimed it back cannot write its stale copy.
    second.write(&stale).expect("buffered");
    let refused = second.force().await.expect_err("stale epoch refused");
    assert!(matches!(refused, LogError::Fenced(_)), "{refused}");
}

// Another instance takes over only once the lease has expired; the
// former owner's next write is refused and latches its log; the decision
// in the store stays the new owner's.
#[tokio::test]
async fn expired_leases_are_taken_over_and_the_former_owner_is_fenced() {
    let pg = PgServer::start();
    let url = pg.create_database("fence").await;
    let a = PgLog::open(options(&url, "a")).expect("open a");
    let b = PgLog::open(options(&url, "b")).expect("open b");
    let mut rec = conformance::sample_record(Mode::Tcc, 2);
    a.write(&rec).expect("write");
    a.force().await.expect("force");

    // A's lease is renewed while it lives: nothing to take over.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        b.take_over_expired(100).await.expect("sweep").is_empty(),
        "took over a live instance's transaction"
    );
    // Renewals every third of the 600 ms lease, counted for the metrics.
    let stats = a.stats();
    assert!(stats.lease_renewals >= 2, "{stats:?}");
    assert_eq!(stats.lease_renewal_failures, 0, "{stats:?}");

    // A misses its renewals (a pause): its lease runs out on the store's
    // clock. B takes the transaction over (epoch 2) and aborts it.
    let sql = pg.connect("fence").await;
    sql.execute(
        "UPDATE tandem_txns SET lease_until = now() - interval '1 second'",
        &[],
    )
    .await
    .expect("expire the lease");
    let taken = b.take_over_expired(100).await.expect("sweep");
    assert_eq!(
        taken,
        vec![rec.gtid],
        "the expired transaction is taken over"
    );
    assert!(
        b.take_over_expired(100).await.expect("sweep").is_empty(),
        "taken over twice"
    );
    let epoch: i64 = sql
        .query_one(
            "SELECT epoch FROM tandem_txns WHERE gtid = $1",
            &[&rec.gtid],
        )
        .await
        .expect("epoch")
        .get(0);
    assert_eq!(epoch, 2, "a takeover bumps the epoch");
    let mut aborted = b.get(&rec.gtid).expect("get").expect("record");
    aborted.state = TxState::Aborting;
    aborted.decision = Some(Decision::Abort);
    b.write(&aborted).expect("write by the new owner");
    b.force().await.expect("force by the new owner");

    // A wakes up and decides commit from its stale copy: refused.
    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    a.write(&rec).expect("buffered");
    let err = a
        .force()
        .await
        .expect_err("the former owner's decision landed");
    assert!(matches!(err, LogError::Fenced(_)), "{err:?}");
    assert!(a.write(&rec).is_err(), "a fenced log takes more writes");
    assert!(a.force().await.is_err(), "a fenced log forces again");
    let stored = b.get(&rec.gtid).expect("get").expect("record");
    assert_eq!(
        stored.decision,
        Some(Decision::Abort),
        "the store's decision changed"
    );
    let decision: Option<i16> = sql
        .query_one(
            "SELECT decision FROM tandem_txns WHERE gtid = $1",
            &[&rec.gtid],
        )
        .await
        .expect("decision")
        .get(0);
    assert_eq!(decision, Some(2));
}

// A decision is written once: even its owner cannot change it.
#[tokio::test]
async fn a_decision_is_never_changed() {
    let pg = PgServer::start();
    let url = pg.create_database("once").await;
    let log = PgLog::open(options(&url, "a")).expect("open");
    let mut rec = conformance::sample_record(Mode::TwoPhase, 1);
    rec.state = TxState::Aborting;
    rec.decision = Some(Decision::Abort);
    log.write(&rec).expect("write");
    log.force().await.expect("force");
    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    log.write(&rec).expect("buffered");
    assert!(log.force().await.is_err(), "a decision changed");
    let sql = pg.connect("once").await;
    let decision: Option<i16> = sql
        .query_one(
            "SELECT decision FROM tandem_txns WHERE gtid = $1",
            &[&rec.gtid],
        )
        .await
        .expect("decision")
        .get(0);
    assert_eq!(decision, Some(2));
}

// The store down at start: a clear error within the store timeout.
#[test]
fn an_unreachable_store_is_a_clear_error() {
    let mut o = options("host=127.0.0.1 port=1 user=postgres dbname=x", "a");
    o.store_timeout = Duration::from_millis(500);
    let err = PgLog::open(o)
        .err()
        .expect("opened a store that is not there");
    let text = err.to_string();
    assert!(text.contains("store"), "{text}");
}
