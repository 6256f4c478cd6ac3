//! In-doubt resolution makes progress: branches whose transaction is still
//! undecided (PENDING) do not hold up the ones behind them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_coordinator::log::MemLog;
use tandem_sdk::barrier::{BarrierStore, BranchKey, MemBarrier};
use tandem_sdk::{Mode, ParticipantServer, TransactionClient};
use tandem_tests::{Scripted, eventually, spawn, start_coordinator};

// Rule: with 150 branches in doubt, of which the first 100 (in key order)
// belong to undecided transactions, the 50 others are still resolved (each
// round once asked about the same first 100 only).
#[tokio::test]
async fn pending_branches_do_not_starve_the_rest() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let barrier = MemBarrier::new();
    let mut pending = Vec::new();
    for _ in 0..100 {
        let gtid = client
            .begin_with_timeout(Mode::Tcc, Some(Duration::from_secs(600)))
            .await
            .expect("begin");
        pending.push(gtid);
    }
    // Gtids the coordinator never heard of (presumed abort), sorting after.
    let unknown: Vec<_> = (0..50).map(|_| uuid::Uuid::now_v7()).collect();
    for gtid in pending.iter().chain(&unknown) {
        let key = BranchKey {
            gtid: *gtid,
            branch_id: 1,
        };
        let mut entry = barrier.enter(key).await.expect("enter");
        entry.put_tried("r", b"x", 1).await.expect("tried");
    }
    let handler = Scripted::yes("p");
    let _p = spawn(
        ParticipantServer::new()
            .barrier(barrier.clone())
            .tcc("r", handler.clone())
            .resolve_in_doubt(coord.url(), Duration::from_millis(1)),
    )
    .await;
    eventually("the 50 unknown ones are cancelled", || {
        handler.rollbacks.load(Ordering::SeqCst) == 50
    })
    .await;
    let left = barrier
        .in_doubt(u64::MAX, None, 1000)
        .await
        .expect("in doubt");
    assert_eq!(left.len(), 100, "only the undecided ones stay in doubt");
}

// Rule: a branch whose gtid retention removed (GetOutcome answers
// FAILED_PRECONDITION, "no longer known") must not hold up the branches
// behind it. Review finding: `in_doubt::resolve` treats every error as "the
// coordinator is unreachable" and `round` resumes at the same cursor, so
// one forgotten gtid stalls resolution of every later branch forever.
#[tokio::test]
async fn a_forgotten_gtid_does_not_starve_the_rest() {
    use tandem_coordinator::log::{Purge, TxnLog};
    let log = Arc::new(MemLog::new());
    // A gtid retention removed (every branch acknowledged, no tombstone):
    // the horizon covers it, so GetOutcome answers "no longer known".
    let forgotten = uuid::Builder::from_unix_timestamp_millis(1_000_000, &[7; 10]).into_uuid();
    log.purge(&[Purge {
        gtid: forgotten,
        tombstone: None,
    }])
    .expect("purge");
    let coord = start_coordinator(log).await;
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let err = client
        .outcome(forgotten)
        .await
        .expect_err("no longer known");
    assert!(
        format!("{err:?}").contains("FailedPrecondition"),
        "GetOutcome of a forgotten gtid: {err:?}"
    );
    let barrier = MemBarrier::new();
    // Gtids the coordinator never heard of (presumed abort), sorting after.
    let unknown: Vec<_> = (0..5).map(|_| uuid::Uuid::now_v7()).collect();
    for gtid in std::iter::once(&forgotten).chain(&unknown) {
        let key = BranchKey {
            gtid: *gtid,
            branch_id: 1,
        };
        let mut entry = barrier.enter(key).await.expect("enter");
        entry.put_tried("r", b"x", 1).await.expect("tried");
    }
    let handler = Scripted::yes("p");
    let _p = spawn(
        ParticipantServer::new()
            .barrier(barrier.clone())
            .tcc("r", handler.clone())
            .resolve_in_doubt(coord.url(), Duration::from_millis(1)),
    )
    .await;
    eventually(
        "the 5 unknown ones behind the forgotten one are cancelled",
        || handler.rollbacks.load(Ordering::SeqCst) == 5,
    )
    .await;
}
