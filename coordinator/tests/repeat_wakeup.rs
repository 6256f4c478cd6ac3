//! A repeated `Submit` of a client-chosen gtid that finds the first
//! call's entry live waits for it to settle. When the store refuses the
//! first call's first write (another instance started the gtid first), the
//! entry is dropped here and the first call redirected; the repeat must be
//! answered too (`Entry::drop_here` wakes it), not left waiting until its
//! client gives up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::engine::NewBranch;
use tandem_coordinator::log::conformance::sample_record;
use tandem_coordinator::log::{SharedMemLog, TxnLog};
use tandem_coordinator::model::Mode;

mod common;

use common::BASE_MS;

fn branches() -> Vec<NewBranch> {
    vec![NewBranch {
        endpoint: "http://p:1".into(),
        resource: "r".into(),
        payload: Bytes::from_static(b"x"),
        mode: None,
        after: Vec::new(),
    }]
}

// Rule: a request waiting on a transaction's change is answered when the
// transaction is dropped here.
#[tokio::test(start_paused = true)]
async fn a_repeat_waiting_on_a_refused_start_is_answered() {
    let store = common::store(Duration::from_secs(3600));
    let a = SharedMemLog::open(store.clone(), "a", "a:1");
    let b = SharedMemLog::open(store.clone(), "b", "b:1");
    let ca = common::coordinator(&a);
    let _recovery = ca.start_recovery().await.expect("recovery");
    let gtid = uuid::Builder::from_unix_timestamp_millis(BASE_MS, &[9; 10]).into_uuid();

    // The first Submit's first write is held at `a` (a slow store).
    a.pause_at_next_flush(true);
    let first = tokio::spawn({
        let ca = ca.clone();
        async move {
            ca.submit(
                Mode::TwoPhase,
                None,
                branches(),
                Some(gtid),
                Vec::new(),
                None,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The client repeats it (its first call timed out) at the same instance.
    let repeat = tokio::spawn({
        let ca = ca.clone();
        async move {
            ca.submit(
                Mode::TwoPhase,
                None,
                branches(),
                Some(gtid),
                Vec::new(),
                None,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Meanwhile instance `b` started the same gtid first.
    let mut theirs = sample_record(Mode::TwoPhase, 1);
    theirs.gtid = gtid;
    b.write(&theirs).expect("write");
    b.force_txn(&gtid).await.expect("b's first write");
    a.set_paused(false);

    let first = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("the first call is answered")
        .expect("task");
    assert!(first.is_err(), "redirected to b: {first:?}");
    let repeat = tokio::time::timeout(Duration::from_secs(30), repeat).await;
    assert!(
        repeat.is_ok(),
        "the repeat still waits 30 s after the transaction was dropped here \
         (first call: {first:?})"
    );
}
