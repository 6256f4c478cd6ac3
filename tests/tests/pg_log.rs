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
    // One database per check of the suite.
    for i in 0..12 {
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
    expire_leases(&sql, a.incarnation()).await;
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

/// Makes the leases `owner` holds run out now (as if it had missed its
/// renewals: paused, or cut off from the store).
async fn expire_leases(sql: &tandem_sdk::postgres::tokio_postgres::Client, owner: uuid::Uuid) {
    sql.execute(
        "UPDATE tandem_instances SET lease_until = now() - interval '1 second'
         WHERE incarnation = $1",
        &[&owner],
    )
    .await
    .expect("expire the leases");
}

// Finding 1 of issue 22: A is paused past its lease, S takes the
// transaction over (epoch 2), aborts and finishes it, and retention removes
// the row. A resumes and forces the COMMIT it decided from its stale copy:
// a later write never creates a row, so it is fenced, and the store has
// nothing that says commit (presumed abort, as S decided).
#[tokio::test]
async fn a_fenced_owners_write_after_retention_is_refused() {
    let pg = PgServer::start();
    let url = pg.create_database("purged").await;
    let sql = pg.connect("purged").await;
    // A long lease: A renews it only at start, so it runs out when told.
    let mut slow = options(&url, "a");
    slow.lease = Duration::from_secs(60);
    let a = PgLog::open(slow).expect("open a");
    let s = PgLog::open(options(&url, "s")).expect("open s");
    let mut rec = conformance::sample_record(Mode::TwoPhase, 2);
    rec.branches[1].payload = bytes::Bytes::from(vec![5u8; 4096]);
    a.write(&rec).expect("write");
    a.force().await.expect("force");

    tokio::time::sleep(Duration::from_millis(100)).await;
    expire_leases(&sql, a.incarnation()).await;
    assert_eq!(
        s.take_over_expired(100).await.expect("sweep"),
        vec![rec.gtid]
    );
    let mut theirs = s.get(&rec.gtid).expect("get").expect("record");
    assert_eq!(theirs.epoch, 2);
    theirs.state = TxState::Aborting;
    theirs.decision = Some(Decision::Abort);
    s.write(&theirs).expect("abort");
    theirs.state = TxState::Aborted;
    s.write(&theirs).expect("finish");
    s.force().await.expect("force by the new owner");
    // Retention removes the finished record.
    s.remove(&rec.gtid).expect("remove");
    s.force().await.expect("force the removal");
    assert!(s.get(&rec.gtid).expect("get").is_none(), "not removed");

    // A wakes up and forces the commit it decided before the takeover.
    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    a.write(&rec).expect("buffered");
    let err = a
        .force()
        .await
        .expect_err("the former owner's commit landed after retention");
    assert!(matches!(err, LogError::Fenced(_)), "{err:?}");
    let rows: i64 = sql
        .query_one(
            "SELECT count(*) FROM tandem_txns WHERE gtid = $1",
            &[&rec.gtid],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 0, "the former owner re-created the row");
    let payloads: i64 = sql
        .query_one(
            "SELECT count(*) FROM tandem_payloads WHERE gtid = $1",
            &[&rec.gtid],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(payloads, 0, "the former owner's payloads landed");
    // Every instance answers from the store: no record, presumed abort.
    assert!(s.get(&rec.gtid).expect("get").is_none());
    let fresh = PgLog::open(options(&url, "t")).expect("open t");
    assert!(fresh.get(&rec.gtid).expect("get").is_none());
}

// Retention's removal lands only on a finished row: one that a stale scan
// (or a gtid started again) shows unfinished in the store is kept.
#[tokio::test]
async fn retention_removes_only_finished_rows() {
    let pg = PgServer::start();
    let url = pg.create_database("keep").await;
    let log = PgLog::open(options(&url, "a")).expect("open");
    let mut unfinished = conformance::sample_record(Mode::Tcc, 2);
    unfinished.branches[0].payload = bytes::Bytes::from(vec![1u8; 4096]);
    let mut finished = conformance::sample_record(Mode::TwoPhase, 1);
    finished.state = TxState::Committed;
    finished.decision = Some(Decision::Commit);
    log.write(&unfinished).expect("write");
    log.write(&finished).expect("write");
    log.force().await.expect("force");
    log.remove(&unfinished.gtid).expect("remove");
    log.remove(&finished.gtid).expect("remove");
    log.force().await.expect("force");
    let sql = pg.connect("keep").await;
    let count = |table: &'static str, gtid: uuid::Uuid| {
        let sql = &sql;
        async move {
            sql.query_one(
                &format!("SELECT count(*) FROM {table} WHERE gtid = $1"),
                &[&gtid],
            )
            .await
            .expect("count")
            .get::<_, i64>(0)
        }
    };
    assert_eq!(count("tandem_txns", finished.gtid).await, 0);
    assert_eq!(count("tandem_txns", unfinished.gtid).await, 1, "removed");
    assert_eq!(
        count("tandem_payloads", unfinished.gtid).await,
        1,
        "its payload removed"
    );
    // The row is still the owner's to write.
    unfinished.state = TxState::Aborting;
    unfinished.decision = Some(Decision::Abort);
    log.write(&unfinished).expect("write");
    log.force()
        .await
        .expect("the owner's write after the refused removal");
}

/// Each row's version (`xmin`, the transaction that last wrote it).
async fn row_versions(
    sql: &tandem_sdk::postgres::tokio_postgres::Client,
) -> std::collections::HashMap<uuid::Uuid, String> {
    sql.query("SELECT gtid, xmin::text FROM tandem_txns", &[])
        .await
        .expect("versions")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

// Issue 22, finding 6: a lease is renewed every third of it, forever; with
// a STUCK backlog, renewing every row's own lease rewrote the whole
// backlog each time. The lease is the owner's: renewal writes one row.
#[tokio::test]
async fn lease_renewal_writes_no_transaction_rows() {
    const STUCK: usize = 1000;
    let pg = PgServer::start();
    let url = pg.create_database("renew").await;
    let sql = pg.connect("renew").await;
    let mut o = options(&url, "a");
    o.lease = Duration::from_millis(300);
    let a = PgLog::open(o).expect("open");
    for _ in 0..STUCK {
        let mut rec = conformance::sample_record(Mode::TwoPhase, 1);
        rec.state = TxState::Stuck;
        rec.decision = Some(Decision::Commit);
        a.write(&rec).expect("write");
    }
    let mut inflight = conformance::sample_record(Mode::Tcc, 1);
    inflight.state = TxState::Committing;
    inflight.decision = Some(Decision::Commit);
    a.write(&inflight).expect("write");
    a.force().await.expect("force");
    let before = row_versions(&sql).await;
    let renewals = a.stats().lease_renewals;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let renewed = a.stats().lease_renewals - renewals;
    assert!(renewed >= 3, "{renewed} renewals");
    let after = row_versions(&sql).await;
    let rewritten = before
        .iter()
        .filter(|(gtid, version)| after.get(*gtid) != Some(*version))
        .count();
    // The owner's lease covers its rows: nobody may claim them.
    let other = PgLog::open(options(&url, "b")).expect("open b");
    assert!(other.take_over_expired(10).await.expect("sweep").is_empty());
    // Every write statement of A counted once its connections close.
    let total_renewals = a.stats().lease_renewals;
    drop(a);
    let updated = |table: &'static str| {
        let sql = &sql;
        async move {
            sql.query_one(
                "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = $1",
                &[&table],
            )
            .await
            .expect("stats")
            .get::<_, i64>(0)
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "{total_renewals} renewals with {STUCK} STUCK rows: {} transaction rows and {} instance \
         rows updated; {rewritten} rows rewritten during {renewed} renewals",
        updated("tandem_txns").await,
        updated("tandem_instances").await
    );
    assert_eq!(
        rewritten,
        0,
        "{renewed} renewals rewrote {rewritten} of {} rows",
        before.len()
    );
}

// A store made by schema version 1 (a lease per row) is migrated in place:
// each registered instance keeps the longest lease its rows had, so a live
// owner's transactions are not claimed by the first instance of the new
// version; its restart still takes them over at once.
#[tokio::test]
async fn a_store_of_schema_1_keeps_its_leases_when_migrated() {
    let pg = PgServer::start();
    let url = pg.create_database("migrate").await;
    let sql = pg.connect("migrate").await;
    let a = PgLog::open(options(&url, "a")).expect("open");
    let rec = conformance::sample_record(Mode::TwoPhase, 2);
    a.write(&rec).expect("write");
    a.force().await.expect("force");
    drop(a);
    // Back to version 1: a lease per row, an hour long.
    sql.batch_execute(
        "ALTER TABLE tandem_txns ADD COLUMN lease_until timestamptz NOT NULL
             DEFAULT now() + interval '1 hour';
         CREATE INDEX tandem_txns_unfinished_lease ON tandem_txns (lease_until)
             WHERE state IN (1, 2, 3, 5, 7);
         ALTER TABLE tandem_instances DROP COLUMN lease_until;
         DROP TABLE tandem_decisions, tandem_horizon;
         DELETE FROM tandem_schema WHERE version > 1;",
    )
    .await
    .expect("schema 1");

    let b = PgLog::open(options(&url, "b")).expect("migrate");
    assert!(
        b.take_over_expired(10).await.expect("sweep").is_empty(),
        "claimed a transaction whose lease runs for an hour"
    );
    assert_eq!(b.get(&rec.gtid).expect("get").as_ref(), Some(&rec));
    let owner = b.locate(&rec.gtid).expect("locate").expect("owner");
    assert!(owner.live && !owner.here, "{owner:?}");
    let restarted = PgLog::open(options(&url, "a")).expect("restart a");
    let own = restarted.scan_own(None, &[], 10).expect("scan own");
    assert_eq!(own.len(), 1, "the restart took its transaction over");
    assert_eq!(own[0].epoch, 2);
}
