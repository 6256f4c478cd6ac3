use super::*;

const ALL: [Option<Mark>; 6] = [
    None,
    Some(Mark::Tried),
    Some(Mark::Refused),
    Some(Mark::Confirmed),
    Some(Mark::Cancelled),
    Some(Mark::EmptyCancelled),
];

// Rule: a try runs only for a branch never seen; every other try is refused
// (repeats, and above all a try arriving after its cancel: anti-hanging).
#[test]
fn try_runs_only_on_a_fresh_branch() {
    for current in ALL {
        let step = decide(current, Phase::Try);
        match current {
            None => assert_eq!(step, Step::Run),
            Some(_) => assert!(matches!(step, Step::Refuse(_)), "{current:?}: {step:?}"),
        }
    }
    let Step::Refuse(why) = decide(Some(Mark::EmptyCancelled), Phase::Try) else {
        panic!("late try not refused");
    };
    assert!(why.contains("cancelled before the try arrived"), "{why}");
}

// Rule: confirm runs once after a try; a repeat is a silent success; confirm
// of something never tried, refused or cancelled is an error.
#[test]
fn confirm_runs_once_after_a_try() {
    assert_eq!(decide(Some(Mark::Tried), Phase::Confirm), Step::Run);
    assert_eq!(
        decide(Some(Mark::Confirmed), Phase::Confirm),
        Step::Skip { record: None }
    );
    for current in [
        None,
        Some(Mark::Refused),
        Some(Mark::Cancelled),
        Some(Mark::EmptyCancelled),
    ] {
        assert!(matches!(decide(current, Phase::Confirm), Step::Refuse(_)));
    }
}

// Rule: cancel without a try (empty rollback) succeeds without the handler
// and is remembered; after a no it is skipped too; repeats are skipped; a
// confirmed branch is never cancelled.
#[test]
fn cancel_is_empty_without_a_try_and_never_repeats() {
    assert_eq!(
        decide(None, Phase::Cancel),
        Step::Skip {
            record: Some(Mark::EmptyCancelled)
        }
    );
    assert_eq!(decide(Some(Mark::Tried), Phase::Cancel), Step::Run);
    assert_eq!(
        decide(Some(Mark::Refused), Phase::Cancel),
        Step::Skip {
            record: Some(Mark::Cancelled)
        }
    );
    for done in [Mark::Cancelled, Mark::EmptyCancelled] {
        assert_eq!(
            decide(Some(done), Phase::Cancel),
            Step::Skip { record: None }
        );
    }
    assert!(matches!(
        decide(Some(Mark::Confirmed), Phase::Cancel),
        Step::Refuse(_)
    ));
}

// Rule: whatever happened, the handler's confirm and cancel are never both
// run for one branch: after a record left by one, the other is refused or
// skipped.
#[test]
fn confirm_and_cancel_exclude_each_other() {
    for (done, other) in [
        (Mark::Confirmed, Phase::Cancel),
        (Mark::Cancelled, Phase::Confirm),
        (Mark::EmptyCancelled, Phase::Confirm),
    ] {
        assert_ne!(
            decide(Some(done), other),
            Step::Run,
            "{done:?} then {other:?}"
        );
    }
}

#[test]
fn records_and_keys_round_trip() {
    for current in ALL.into_iter().flatten() {
        let r = BarrierRecord {
            mark: current,
            updated_ms: 1_700_000_000_123,
        };
        assert_eq!(BarrierRecord::decode(&r.encode()), Some(r));
    }
    assert_eq!(BarrierRecord::decode(&[9; 9]), None);
    assert_eq!(BarrierRecord::decode(&[1; 3]), None);
    let k = BranchKey {
        gtid: uuid::Uuid::now_v7(),
        branch_id: 7,
    };
    assert_eq!(BranchKey::from_bytes(&k.to_bytes()), Some(k));
    assert_eq!(BranchKey::from_bytes(&[0; 19]), None);
}

#[tokio::test]
async fn mem_barrier_passes_the_conformance_suite() {
    conformance::run_all(MemBarrier::new).await;
}

#[tokio::test]
async fn key_locks_forget_released_keys() {
    let locks = locks::KeyLocks::default();
    let k = conformance::key(1, 1);
    let first = locks.lock(k).await;
    let waiter = tokio::spawn({
        let locks = locks.clone();
        async move { drop(locks.lock(k).await) }
    });
    tokio::task::yield_now().await;
    drop(first);
    waiter.await.expect("waiter");
    assert_eq!(locks.len(), 0);
}

/// A store that counts `sync` calls, around a MemBarrier.
#[derive(Clone, Default)]
struct CountingStore {
    inner: MemBarrier,
    syncs: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

struct CountingEntry {
    inner: Box<dyn BarrierEntry>,
    syncs: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl BarrierEntry for CountingEntry {
    fn record(&self) -> Option<BarrierRecord> {
        self.inner.record()
    }
    fn put(&mut self, mark: Mark) -> BoxFuture<'_, Result<(), BarrierError>> {
        self.inner.put(mark)
    }
    fn sync(&mut self) -> BoxFuture<'_, Result<(), BarrierError>> {
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.sync()
    }
    fn put_tried<'a>(
        &'a mut self,
        resource: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<(), BarrierError>> {
        self.inner.put_tried(resource, payload)
    }
}

impl BarrierStore for CountingStore {
    fn enter(&self, key: BranchKey) -> BoxFuture<'_, Result<Box<dyn BarrierEntry>, BarrierError>> {
        Box::pin(async move {
            let inner = self.inner.enter(key).await?;
            Ok(Box::new(CountingEntry {
                inner,
                syncs: self.syncs.clone(),
            }) as Box<dyn BarrierEntry>)
        })
    }
    fn in_doubt(
        &self,
        before_ms: u64,
        after: Option<BranchKey>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<InDoubt>, BarrierError>> {
        self.inner.in_doubt(before_ms, after, limit)
    }
    fn stored(&self) -> BoxFuture<'_, Result<usize, BarrierError>> {
        self.inner.stored()
    }
    fn purge(
        &self,
        from: Option<BranchKey>,
        before_ms: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<PurgePage, BarrierError>> {
        self.inner.purge(from, before_ms, limit)
    }
}

// Rule: a yes vote is sent only after the store is synced, so a reservation
// the handler wrote in the barrier's store is durable before it is promised
// (found by the crash loop: a participant killed right after voting yes
// lost its hold and later "confirmed" nothing, creating money).
#[tokio::test]
async fn a_yes_vote_waits_for_the_store_to_be_synced() {
    use crate::handler::{BranchContext, Vote};
    let store = CountingStore::default();
    let ctx = BranchContext {
        gtid: uuid::Uuid::now_v7(),
        branch_id: 1,
        resource: "r".into(),
        attempt: 1,
        phase: Phase::Try,
    };
    let yes: crate::handler::BoxFuture<'_, _> = Box::pin(async { Ok(Vote::yes()) });
    let vote = gate::phase_one(&store, &ctx, b"p", "try", yes)
        .await
        .expect("try");
    assert_eq!(vote, Vote::yes());
    assert_eq!(store.syncs.load(std::sync::atomic::Ordering::SeqCst), 1);
    let ctx2 = BranchContext {
        branch_id: 2,
        ..ctx
    };
    let no: crate::handler::BoxFuture<'_, _> = Box::pin(async { Ok(Vote::no("full")) });
    gate::phase_one(&store, &ctx2, b"p", "try", no)
        .await
        .expect("try");
    assert_eq!(
        store.syncs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a no is stored (durably) by put, not by an extra sync"
    );
}
