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

// Rule: a message delivery runs on a fresh branch (its `Tried` is stored
// first) and again on `Tried` (an earlier run did not finish), is a silent
// success once `Confirmed`, and is refused on any other protocol's record.
// Its success leaves `Confirmed`, as a confirm's does, so the stores'
// transactions (PgBarrier::begin, SledBarrier::transaction) serve it.
#[test]
fn a_delivery_runs_until_confirmed() {
    assert_eq!(decide(None, Phase::Deliver), Step::Run);
    assert_eq!(decide(Some(Mark::Tried), Phase::Deliver), Step::Run);
    assert_eq!(
        decide(Some(Mark::Confirmed), Phase::Deliver),
        Step::Skip { record: None }
    );
    for other in [Mark::Refused, Mark::Cancelled, Mark::EmptyCancelled] {
        assert!(
            matches!(decide(Some(other), Phase::Deliver), Step::Refuse(_)),
            "{other:?}"
        );
    }
    assert_eq!(Phase::Deliver.done_mark(), Some(Mark::Confirmed));
}

#[test]
fn records_and_keys_round_trip() {
    for current in ALL.into_iter().flatten() {
        let r = BarrierRecord {
            mark: current,
            updated_ms: 1_700_000_000_123,
            epoch: 42,
        };
        assert_eq!(BarrierRecord::decode(&r.encode()), Some(r));
        // A record of an earlier version (9 bytes) reads with epoch 0.
        assert_eq!(
            BarrierRecord::decode(&r.encode()[..9]),
            Some(BarrierRecord { epoch: 0, ..r })
        );
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

// Two clones of one MemBarrier are what the replicas of a simulated
// participant share: they serialise a branch as the gate assumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_barrier_clones_pass_the_shared_conformance_suite() {
    conformance::run_shared(|| {
        let store = MemBarrier::new();
        (store.clone(), store)
    })
    .await;
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
    fn compare_and_set<'a>(
        &'a mut self,
        from: Option<Mark>,
        to: BarrierRecord,
        tried: Option<(&'a str, &'a [u8])>,
    ) -> BoxFuture<'a, Result<(), BarrierError>> {
        self.inner.compare_and_set(from, to, tried)
    }
    fn reread(&mut self) -> BoxFuture<'_, Result<(), BarrierError>> {
        self.inner.reread()
    }
    fn sync(&mut self) -> BoxFuture<'_, Result<(), BarrierError>> {
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.sync()
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
        epoch: 1,
        traceparent: None,
    };
    let yes: crate::handler::BoxFuture<'_, _> = Box::pin(async { Ok(Vote::yes()) });
    let vote = gate::phase_one(&store, &ctx, b"p", "try", yes)
        .await
        .result
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
        .result
        .expect("try");
    assert_eq!(
        store.syncs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a no is stored (durably) by put, not by an extra sync"
    );
}

// The epoch rule, through the gate: a call from an older epoch than the
// branch has seen is refused in every phase without running the handler;
// an equal or newer one runs and raises the epoch stored; epoch 0 (in-doubt
// resolution) is never refused.
#[tokio::test]
async fn calls_from_an_older_epoch_are_refused() {
    use crate::handler::{BranchContext, HandlerError, Vote};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let store = MemBarrier::new();
    let ran = std::sync::Arc::new(AtomicUsize::new(0));
    let ctx = |branch_id, phase, epoch| BranchContext {
        gtid: uuid::Uuid::from_u128(7),
        branch_id,
        resource: "r".into(),
        attempt: 1,
        phase,
        epoch,
        traceparent: None,
    };
    let yes = |ran: &std::sync::Arc<AtomicUsize>| -> crate::handler::BoxFuture<'static, Result<Vote, HandlerError>> {
        let ran = ran.clone();
        Box::pin(async move {
            ran.fetch_add(1, SeqCst);
            Ok(Vote::yes())
        })
    };
    let ack = |ran: &std::sync::Arc<AtomicUsize>| -> crate::handler::BoxFuture<'static, Result<(), HandlerError>> {
        let ran = ran.clone();
        Box::pin(async move {
            ran.fetch_add(1, SeqCst);
            Ok(())
        })
    };
    let epoch_of = |branch_id| {
        let store = store.clone();
        async move {
            let key = BranchKey {
                gtid: uuid::Uuid::from_u128(7),
                branch_id,
            };
            store
                .enter(key)
                .await
                .expect("enter")
                .record()
                .map(|r| r.epoch)
        }
    };

    // Branch 1: tried at epoch 1, then the new owner (epoch 2) confirms;
    // the former owner's cancel (epoch 1) is refused, its repeated confirm
    // too, and the handler ran twice (try, confirm).
    let c = ctx(1, Phase::Try, 1);
    assert_eq!(
        gate::phase_one(&store, &c, b"p", "try", yes(&ran))
            .await
            .result
            .expect("try"),
        Vote::yes()
    );
    assert_eq!(epoch_of(1).await, Some(1));
    let c = ctx(1, Phase::Confirm, 2);
    gate::phase_two(&store, &c, b"p", "confirm", ack(&ran))
        .await
        .result
        .expect("confirm at 2");
    assert_eq!(epoch_of(1).await, Some(2), "raised");
    let c = ctx(1, Phase::Cancel, 1);
    let stale = gate::phase_two(&store, &c, b"p", "cancel", ack(&ran)).await;
    assert_eq!(stale.passage, gate::Passage::Refused, "counted as refused");
    let refused = stale.result.expect_err("stale cancel");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("epoch 1"), "{refused:?}");
    assert!(
        !tandem_proto::rpc::is_permanent(&refused),
        "retried, not permanent"
    );
    let c = ctx(1, Phase::Confirm, 1);
    gate::phase_two(&store, &c, b"p", "confirm", ack(&ran))
        .await
        .result
        .expect_err("stale confirm");
    assert_eq!(ran.load(SeqCst), 2, "the stale calls ran nothing");

    // Branch 2: the new owner (epoch 2) cancels before any try; the former
    // owner's late try (epoch 1) is a no vote for its epoch.
    let c = ctx(2, Phase::Cancel, 2);
    gate::phase_two(&store, &c, b"p", "cancel", ack(&ran))
        .await
        .result
        .expect("empty cancel");
    let c = ctx(2, Phase::Try, 1);
    let stale = gate::phase_one(&store, &c, b"p", "try", yes(&ran)).await;
    // Refused for its epoch first: not counted as a hanging try.
    assert_eq!(stale.passage, gate::Passage::Refused);
    match stale.result.expect("answered") {
        Vote::No { reason } => assert!(reason.contains("epoch"), "{reason}"),
        v => panic!("stale try voted {v:?}"),
    }
    assert_eq!(ran.load(SeqCst), 2);

    // Branch 3: a repeat at a newer epoch raises the stored epoch even when
    // it runs nothing; epoch 0 is never refused and lowers nothing.
    let c = ctx(3, Phase::Try, 1);
    gate::phase_one(&store, &c, b"p", "try", yes(&ran))
        .await
        .result
        .expect("try");
    let c = ctx(3, Phase::Confirm, 1);
    gate::phase_two(&store, &c, b"p", "confirm", ack(&ran))
        .await
        .result
        .expect("confirm");
    let c = ctx(3, Phase::Confirm, 3);
    gate::phase_two(&store, &c, b"p", "confirm", ack(&ran))
        .await
        .result
        .expect("repeat at 3");
    assert_eq!(epoch_of(3).await, Some(3));
    let c = ctx(3, Phase::Confirm, 0);
    gate::phase_two(&store, &c, b"p", "confirm", ack(&ran))
        .await
        .result
        .expect("epoch 0");
    assert_eq!(epoch_of(3).await, Some(3));
    assert_eq!(ran.load(SeqCst), 4, "each handler call once");
}
