//! The conformance suite every [`BarrierStore`] must pass: the contract on
//! the trait, as code. Run it from a test with a fresh store per case:
//!
//! ```no_run
//! # async fn t() {
//! use tandem_sdk::barrier::{conformance, MemBarrier};
//! conformance::run_all(MemBarrier::new).await;
//! # }
//! ```
//!
//! and, with two handles on one store's records (two replicas of a
//! participant: for a store used by one process, two clones; for a shared
//! database, two stores on two independent pools), [`run_shared`]:
//!
//! ```no_run
//! # async fn t() {
//! use tandem_sdk::barrier::{conformance, MemBarrier};
//! conformance::run_shared(|| {
//!     let store = MemBarrier::new();
//!     (store.clone(), store)
//! })
//! .await;
//! # }
//! ```
//!
//! Durability across a reopen is store-specific; test it next to the store.
//! Failures panic with the rule that broke.

mod delivery;
mod shared;

use std::time::Duration;

pub use delivery::a_delivery_runs_once_until_it_succeeds;
pub use shared::{
    a_branch_is_held_by_one_handle_at_a_time, other_branches_do_not_wait_across_handles,
    racing_calls_through_the_gate_run_one_at_a_time, run_shared,
};

use super::{BarrierRecord, BarrierStore, BranchKey, Mark, now_ms};

/// Runs every case, each on a store made by `make`.
pub async fn run_all<S: BarrierStore>(make: impl Fn() -> S) {
    unknown_branch_has_no_record(&make()).await;
    compare_and_set_writes_only_over_the_mark_given(&make()).await;
    put_is_read_back(&make()).await;
    same_branch_waits_for_the_holder(&make()).await;
    other_branches_do_not_wait(&make()).await;
    purge_removes_only_old_finished_records(&make()).await;
    purge_pages_cover_every_record(&make()).await;
    in_doubt_lists_old_tried_branches_with_their_payload(&make()).await;
    nothing_remains_of_finished_branches(&make()).await;
    the_epoch_is_read_back(&make()).await;
    a_repeated_try_leaves_the_first_hold_to_its_cancel(&make()).await;
    a_delivery_runs_once_until_it_succeeds(&make()).await;
}

/// Rule, through the barrier gate: a repeated try of a branch whose first
/// try voted yes is answered no without running the handler, and leaves
/// the record `Tried`, so the cancel that the coordinator sends after that
/// no runs the handler and releases the first try's work (a record
/// overwritten with `Refused` would skip it, and the hold would stay:
/// issue 22, finding 5).
pub async fn a_repeated_try_leaves_the_first_hold_to_its_cancel(store: &dyn BarrierStore) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use super::Phase;
    use super::gate::{self, Passage};
    use crate::handler::{BoxFuture, BranchContext, HandlerError, Vote};

    let k = key(10, 1);
    let ctx = |phase| BranchContext {
        gtid: k.gtid,
        branch_id: k.branch_id,
        resource: "res".into(),
        attempt: 1,
        phase,
        epoch: 1,
        traceparent: None,
    };
    let ran = Arc::new(AtomicUsize::new(0));
    let yes = || -> BoxFuture<'static, Result<Vote, HandlerError>> {
        let ran = ran.clone();
        Box::pin(async move {
            ran.fetch_add(1, SeqCst);
            Ok(Vote::yes())
        })
    };
    let first = gate::phase_one(store, &ctx(Phase::Try), b"pay", "try", yes()).await;
    assert_eq!(first.result.expect("first try"), Vote::yes());
    let repeat = gate::phase_one(store, &ctx(Phase::Try), b"pay", "try", yes()).await;
    assert_eq!(repeat.passage, Passage::RepeatedTry);
    let Ok(Vote::No { reason }) = repeat.result else {
        panic!("a repeated try must be answered no: {:?}", repeat.result);
    };
    assert!(reason.contains("may still hold"), "{reason}");
    assert_eq!(
        ran.load(SeqCst),
        1,
        "the handler ran for the first try only"
    );
    assert_eq!(
        mark_of(store, k).await,
        Some(Mark::Tried),
        "the repeat left the first try's record"
    );
    let ran_cancel = ran.clone();
    let cancel: BoxFuture<'static, Result<(), HandlerError>> = Box::pin(async move {
        ran_cancel.fetch_add(1, SeqCst);
        Ok(())
    });
    let cancelled = gate::phase_two(store, &ctx(Phase::Cancel), b"pay", "cancel", cancel).await;
    cancelled.result.expect("cancel");
    assert_eq!(cancelled.passage, Passage::Ran);
    assert_eq!(ran.load(SeqCst), 2, "the cancel reached the handler");
    assert_eq!(mark_of(store, k).await, Some(Mark::Cancelled));
}

/// Rule: the epoch given to `put` / `put_tried` is what the next `enter`
/// reads (the gate passes the highest seen; the store keeps what it is
/// given, and a store that keeps the maximum itself is right too).
pub async fn the_epoch_is_read_back(store: &dyn BarrierStore) {
    let k = key(9, 1);
    {
        let mut entry = store.enter(k).await.expect("enter");
        entry.put_tried("res", b"pay", 3).await.expect("put_tried");
        assert_eq!(entry.record().map(|r| r.epoch), Some(3), "own put");
    }
    let epoch_of = |k| async move {
        let entry = store.enter(k).await.expect("enter");
        entry.record().map(|r| r.epoch)
    };
    assert_eq!(epoch_of(k).await, Some(3), "put_tried's epoch");
    {
        let mut entry = store.enter(k).await.expect("enter");
        entry
            .put(Mark::Tried, 7)
            .await
            .expect("same mark, newer epoch");
    }
    assert_eq!(epoch_of(k).await, Some(7), "a newer epoch on the same mark");
    {
        let mut entry = store.enter(k).await.expect("enter");
        entry.put(Mark::Confirmed, 7).await.expect("put");
    }
    let entry = store.enter(k).await.expect("enter");
    let record = entry.record().expect("record");
    assert_eq!((record.mark, record.epoch), (Mark::Confirmed, 7));
}

/// A key for tests: branch `branch` of a fixed-prefix gtid `n`.
pub fn key(n: u8, branch: u32) -> BranchKey {
    let mut bytes = [0u8; 16];
    bytes[15] = n;
    BranchKey {
        gtid: uuid::Uuid::from_bytes(bytes),
        branch_id: branch,
    }
}

async fn put(store: &dyn BarrierStore, key: BranchKey, mark: Mark) {
    let mut entry = store.enter(key).await.expect("enter");
    entry.put(mark, 1).await.expect("put");
}

async fn mark_of(store: &dyn BarrierStore, key: BranchKey) -> Option<Mark> {
    let entry = store.enter(key).await.expect("enter");
    entry.record().map(|r| r.mark)
}

/// Rule: [`compare_and_set`](super::BarrierEntry::compare_and_set) writes
/// only over the mark it is given (`None`: no record yet), and a write
/// that finds another leaves everything as it was: no record is ever
/// overwritten blindly, whatever wrote it.
pub async fn compare_and_set_writes_only_over_the_mark_given(store: &dyn BarrierStore) {
    let k = key(11, 1);
    let record = |mark, epoch| BarrierRecord {
        mark,
        updated_ms: now_ms(),
        epoch,
    };
    let mut entry = store.enter(k).await.expect("enter");
    assert!(
        entry
            .compare_and_set(Some(Mark::Tried), record(Mark::Confirmed, 1), None)
            .await
            .is_err(),
        "an update of a branch that has no record"
    );
    entry
        .compare_and_set(None, record(Mark::Tried, 1), Some(("res", b"pay")))
        .await
        .expect("the first record");
    assert_eq!(entry.record().map(|r| r.mark), Some(Mark::Tried));
    assert!(
        entry
            .compare_and_set(None, record(Mark::EmptyCancelled, 1), None)
            .await
            .is_err(),
        "a second first record"
    );
    assert!(
        entry
            .compare_and_set(Some(Mark::Confirmed), record(Mark::Cancelled, 1), None)
            .await
            .is_err(),
        "an update over another mark than the stored"
    );
    drop(entry);
    let listed = store.in_doubt(u64::MAX, None, 10).await.expect("in_doubt");
    assert_eq!(
        listed
            .iter()
            .map(|d| (d.key, d.resource.as_str(), d.payload.as_ref()))
            .collect::<Vec<_>>(),
        vec![(k, "res", b"pay".as_slice())],
        "the refused writes changed nothing"
    );
    let mut entry = store.enter(k).await.expect("enter");
    let read = entry.record().expect("record");
    assert_eq!((read.mark, read.epoch), (Mark::Tried, 1));
    entry
        .compare_and_set(Some(Mark::Tried), record(Mark::Cancelled, 2), None)
        .await
        .expect("over the mark read");
    drop(entry);
    let read = store
        .enter(k)
        .await
        .expect("enter")
        .record()
        .expect("record");
    assert_eq!((read.mark, read.epoch), (Mark::Cancelled, 2));
    assert!(
        store
            .in_doubt(u64::MAX, None, 10)
            .await
            .expect("in_doubt")
            .is_empty(),
        "leaving Tried dropped the resource and payload"
    );
}

/// Rule: a branch never seen has no record.
pub async fn unknown_branch_has_no_record(store: &dyn BarrierStore) {
    assert_eq!(mark_of(store, key(1, 1)).await, None, "fresh store");
}

/// Rule: what `put` stored is read back by the next `enter`, stamped with
/// the current time, and a later `put` replaces it.
pub async fn put_is_read_back(store: &dyn BarrierStore) {
    let before = now_ms();
    {
        let mut entry = store.enter(key(2, 1)).await.expect("enter");
        entry.put(Mark::Tried, 1).await.expect("put");
        assert_eq!(
            entry.record().map(|r| r.mark),
            Some(Mark::Tried),
            "entry sees its own put"
        );
    }
    let entry = store.enter(key(2, 1)).await.expect("enter");
    let record = entry.record().expect("record stored");
    assert_eq!(record.mark, Mark::Tried);
    assert!(record.updated_ms >= before && record.updated_ms <= now_ms() + 1);
    drop(entry);
    put(store, key(2, 1), Mark::Confirmed).await;
    assert_eq!(
        mark_of(store, key(2, 1)).await,
        Some(Mark::Confirmed),
        "replaced"
    );
    assert_eq!(
        mark_of(store, key(2, 2)).await,
        None,
        "other branch untouched"
    );
}

/// Rule: a second `enter` of the same branch waits until the first entry is
/// dropped, and then sees what it stored.
pub async fn same_branch_waits_for_the_holder(store: &dyn BarrierStore) {
    let mut first = store.enter(key(3, 1)).await.expect("enter");
    let second = store.enter(key(3, 1));
    tokio::pin!(second);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut second)
            .await
            .is_err(),
        "second enter went through while the first held the branch"
    );
    first.put(Mark::Cancelled, 1).await.expect("put");
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("second enter stuck after the first was dropped")
        .expect("enter");
    assert_eq!(second.record().map(|r| r.mark), Some(Mark::Cancelled));
}

/// Rule: entries of different branches do not wait for each other.
pub async fn other_branches_do_not_wait(store: &dyn BarrierStore) {
    let _held = store.enter(key(4, 1)).await.expect("enter");
    tokio::time::timeout(Duration::from_secs(5), store.enter(key(4, 2)))
        .await
        .expect("a different branch waited")
        .expect("enter");
}

/// Rule: purge removes finished records stored before the cut-off and
/// nothing else: `Tried` records stay however old, newer records stay.
pub async fn purge_removes_only_old_finished_records(store: &dyn BarrierStore) {
    let marks = [
        Mark::Tried,
        Mark::Refused,
        Mark::Confirmed,
        Mark::Cancelled,
        Mark::EmptyCancelled,
    ];
    for (i, mark) in marks.iter().enumerate() {
        put(store, key(5, i as u32), *mark).await;
    }
    // Nothing is older than a cut-off in the past.
    let page = store.purge(None, 1, 100).await.expect("purge");
    assert_eq!((page.scanned, page.removed), (5, 0));
    let cut = now_ms() + 1;
    let page = store.purge(None, cut, 100).await.expect("purge");
    assert_eq!((page.scanned, page.removed, page.next), (5, 4, None));
    assert_eq!(
        mark_of(store, key(5, 0)).await,
        Some(Mark::Tried),
        "Tried kept"
    );
    for i in 1..5 {
        assert_eq!(mark_of(store, key(5, i)).await, None, "finished removed");
    }
}

/// Rule: a sweep in pages of `limit` visits every record once and ends.
pub async fn purge_pages_cover_every_record(store: &dyn BarrierStore) {
    for n in 0..10u8 {
        put(store, key(6, u32::from(n)), Mark::Confirmed).await;
    }
    let cut = now_ms() + 1;
    let (mut from, mut scanned, mut removed, mut pages) = (None, 0, 0, 0);
    loop {
        let page = store.purge(from, cut, 3).await.expect("purge");
        assert!(page.scanned <= 3, "page larger than the limit");
        scanned += page.scanned;
        removed += page.removed;
        pages += 1;
        assert!(pages <= 5, "sweep does not end");
        match page.next {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    assert_eq!((scanned, removed), (10, 10));
}

/// Rule: `in_doubt` lists the branches still `Tried` before the cut-off,
/// with the resource and payload given to `put_tried`; a branch that moved
/// on (confirmed, cancelled) is not listed.
pub async fn in_doubt_lists_old_tried_branches_with_their_payload(store: &dyn BarrierStore) {
    for branch in 1..=3 {
        let mut entry = store.enter(key(7, branch)).await.expect("enter");
        entry
            .put_tried(
                &format!("res-{branch}"),
                format!("pay-{branch}").as_bytes(),
                1,
            )
            .await
            .expect("put_tried");
    }
    put(store, key(7, 2), Mark::Confirmed).await;
    put(store, key(7, 4), Mark::Tried).await; // no resource stored: never listed
    assert!(
        store
            .in_doubt(1, None, 10)
            .await
            .expect("in_doubt")
            .is_empty(),
        "nothing is older than a cut-off in the past"
    );
    let found = store
        .in_doubt(now_ms() + 1, None, 10)
        .await
        .expect("in_doubt");
    let listed: Vec<(u32, String, Vec<u8>)> = found
        .iter()
        .map(|d| (d.key.branch_id, d.resource.clone(), d.payload.to_vec()))
        .collect();
    assert_eq!(
        listed,
        vec![
            (1, "res-1".to_string(), b"pay-1".to_vec()),
            (3, "res-3".to_string(), b"pay-3".to_vec()),
        ]
    );
    assert_eq!(
        store
            .in_doubt(now_ms() + 1, None, 1)
            .await
            .expect("limit")
            .len(),
        1
    );
    // Paging: after the first one, the second; after that, nothing.
    let first = store.in_doubt(now_ms() + 1, None, 1).await.expect("page 1");
    let second = store
        .in_doubt(now_ms() + 1, Some(first[0].key), 1)
        .await
        .expect("page 2");
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].key, key(7, 3));
    let third = store
        .in_doubt(now_ms() + 1, Some(second[0].key), 1)
        .await
        .expect("page 3");
    assert!(third.is_empty(), "{third:?}");
}

/// Once every branch is finished and purged, nothing of them remains (no
/// in-doubt entry, payload or record).
pub async fn nothing_remains_of_finished_branches(store: &dyn BarrierStore) {
    for branch in 1..=50 {
        let mut entry = store.enter(key(9, branch)).await.expect("enter");
        entry
            .put_tried("res", &[7u8; 1000], 1)
            .await
            .expect("put_tried");
        let done = if branch % 2 == 0 {
            Mark::Confirmed
        } else {
            Mark::Cancelled
        };
        entry.put(done, 1).await.expect("finish");
    }
    assert!(
        store
            .in_doubt(u64::MAX, None, 100)
            .await
            .expect("in_doubt")
            .is_empty(),
        "finished branches are not in doubt"
    );
    let mut from = None;
    loop {
        let page = store.purge(from, u64::MAX, 256).await.expect("purge");
        match page.next {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    assert_eq!(
        store.stored().await.expect("stored"),
        0,
        "something of a finished branch remains"
    );
}
