//! A coordinator whose shared log latches while it is idle (another
//! process registered under its instance name, so its lease renewal
//! found the registration gone) stops deciding at its next takeover
//! sweep and says so, instead of staying ready over a log that refuses
//! all work while the rows it owned wait for someone to claim them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tandem_coordinator::log::SharedMemLog;

mod common;

const LEASE: Duration = Duration::from_millis(600);

// Rule: a latched log halts the coordinator, even with no request to see it.
#[tokio::test(start_paused = true)]
async fn a_log_latched_while_idle_halts_the_coordinator() {
    let store = common::store(LEASE);
    let a = SharedMemLog::open(store.clone(), "a", "a:1");
    let _renewer = a.spawn_renewer(LEASE / 3);
    let ca = common::coordinator(&a);
    let _recovery = ca.start_recovery().await.expect("recovery");
    let _takeover = ca.start_takeover(LEASE / 4);
    tokio::time::sleep(LEASE).await;
    assert!(!ca.is_halted(), "a healthy coordinator is not halted");

    // Another process registers as instance `a`: the first one's renewal
    // latches its log (fenced).
    let _a2 = SharedMemLog::open(store.clone(), "a", "a:2");
    tokio::time::sleep(LEASE * 3).await;
    assert!(a.halted().is_some(), "the first incarnation's log latched");
    assert!(
        ca.is_halted(),
        "the coordinator over a latched log still reports itself ready"
    );
}
