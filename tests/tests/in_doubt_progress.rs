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
