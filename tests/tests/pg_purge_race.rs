//! A first write of a gtid the retention horizon covers never creates its
//! row, even when it overlaps a purge of that gtid: `write_batch` reads
//! the horizon `FOR SHARE` inside its INSERT. Read from the statement's
//! snapshot (READ COMMITTED), the INSERT saw the old horizon, waited on
//! the purge's lock on the row, and inserted the purged row again once the
//! purge committed (undecided, epoch 1). Real PostgreSQL, two connections.

use std::time::Duration;

use tandem_coordinator::log::conformance::sample_record;
use tandem_coordinator::log::{PgLog, PgOptions, Purge, TxnLog};
use tandem_coordinator::model::{BranchState, Decision, Mode, TxState};
use tandem_tests::pg::PgServer;

fn open(url: &str, name: &str) -> PgLog {
    let mut o = PgOptions::new(url, name);
    o.lease = Duration::from_secs(30);
    o.store_timeout = Duration::from_secs(10);
    PgLog::open(o).expect("open the store")
}

// Rule: a first write that overlaps a purge of its gtid is fenced (or
// refused), never creates the purged row again.
#[tokio::test]
async fn a_first_write_overlapping_a_purge_does_not_recreate_the_row() {
    let pg = PgServer::start();
    let url = pg.create_database("purgerace").await;
    let a = open(&url, "a");
    let b = std::sync::Arc::new(open(&url, "b"));

    // `b` ran the transaction (the client's repeat, while `a` was paused
    // with its own first write of the gtid unsent) and finished it.
    let mut done = sample_record(Mode::TwoPhase, 1);
    done.state = TxState::Committed;
    done.decision = Some(Decision::Commit);
    done.branches[0].state = BranchState::Committed;
    let gtid = done.gtid;
    b.write(&done).expect("write");
    b.force_txn(&gtid).await.expect("force");

    // A session holding a row lock that b's purge meets after it raised
    // the horizon and deleted the row, before it commits: the purge
    // transaction stays open for a moment, as any slow purge does.
    let raw = pg.connect("purgerace").await;
    raw.execute(
        "INSERT INTO tandem_payloads (gtid, branch, payload) VALUES ($1, 99, 'x')",
        &[&gtid],
    )
    .await
    .expect("payload row");
    raw.batch_execute("BEGIN").await.expect("begin");
    raw.execute(
        "SELECT 1 FROM tandem_payloads WHERE gtid = $1 AND branch = 99 FOR UPDATE",
        &[&gtid],
    )
    .await
    .expect("lock");

    // Retention at b removes the finished record (no tombstone needed:
    // every branch acknowledged).
    let purging = {
        let b = b.clone();
        std::thread::spawn(move || {
            b.purge(&[Purge {
                gtid,
                tombstone: None,
            }])
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // `a` resumes: its first write of the gtid goes out while the purge
    // is in progress.
    let mut stale = sample_record(Mode::TwoPhase, 1);
    stale.gtid = gtid;
    stale.state = TxState::Preparing;
    a.write(&stale).expect("buffered");
    let forced = tokio::spawn(a.force_txn(&gtid));
    tokio::time::sleep(Duration::from_millis(500)).await;

    raw.batch_execute("COMMIT").await.expect("release");
    purging.join().expect("thread").expect("purge");
    let forced = tokio::time::timeout(Duration::from_secs(10), forced)
        .await
        .expect("force answered")
        .expect("task");

    let horizon = b.horizon().expect("horizon");
    assert!(
        horizon.may_have_purged(&gtid),
        "the purge raised the horizon"
    );
    let row = b.get(&gtid).expect("get");
    assert!(
        row.is_none() && forced.is_err(),
        "the purged row was created again by a first write that overlapped the purge \
         (force: {forced:?}; row: {:?})",
        row.map(|r| (r.state, r.decision, r.epoch))
    );
}
