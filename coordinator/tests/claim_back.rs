//! Every row an instance owns and has not finished is driven. An instance
//! that takes a row back after losing it (paused past its lease, claimed
//! by another instance that then stopped too) may still hold a stale live
//! entry of it; recovery reads the row again at its new epoch and drives
//! it, instead of skipping it as "taken over by a request".

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tandem_coordinator::log::{SharedMemLog, TxnLog};
use tandem_coordinator::model::{Mode, TxState};

mod common;

const LEASE: Duration = Duration::from_millis(600);

// Rule: a row an instance claims is driven at once (undecided: aborted).
#[tokio::test(start_paused = true)]
async fn a_row_claimed_back_from_a_stale_owner_is_driven() {
    let store = common::store(LEASE);
    let a = SharedMemLog::open(store.clone(), "a", "a:1");
    let _renewer = a.spawn_renewer(LEASE / 3);
    let ca = common::coordinator(&a);
    let _recovery = ca.start_recovery().await.expect("recovery");
    let _takeover = ca.start_takeover(LEASE / 4);

    // An interactive transaction, waiting for its client.
    let gtid = ca
        .begin(
            Mode::TwoPhase,
            Some(Duration::from_secs(600)),
            None,
            Vec::new(),
            None,
        )
        .await
        .expect("begin");
    assert_eq!(store.row(&gtid).expect("row").epoch, 1);

    // `a` is paused past its lease; `b` takes the transaction over, and
    // stops as well (paused, partitioned) before it drove it.
    a.set_paused(true);
    tokio::time::sleep(LEASE * 2).await;
    let b = SharedMemLog::open(store.clone(), "b", "b:1");
    assert_eq!(b.take_over(&gtid).await.expect("claim"), vec![gtid]);
    tokio::time::sleep(LEASE * 2).await;

    // `a` resumes and its takeover sweep claims the row back.
    a.set_paused(false);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let row = store.row(&gtid).expect("row");
    assert_eq!(row.owner, a.incarnation(), "claimed back by a");
    let driven = row.state != TxState::Active;
    // What the stale entry does at its deadline.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(
        driven,
        "10 s after claiming it back, `a` has not driven its row (epoch {}, state {}): \
         recovery skipped it for the stale live entry, which acted only at its deadline \
         10 minutes later; then `a` halted: {:?}; row now: {:?}",
        row.epoch,
        row.state,
        a.halted(),
        store
            .row(&gtid)
            .map(|r| (r.epoch, r.state, r.owner == a.incarnation()))
    );
}
