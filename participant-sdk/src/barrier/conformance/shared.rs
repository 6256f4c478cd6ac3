//! The cases on two handles of one store's records, as two replicas of a
//! participant service have them: the serialisation the gate assumes must
//! hold across handles, not only within one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use super::key;
use crate::barrier::gate::{self, Passage};
use crate::barrier::{BarrierStore, Mark, Phase};
use crate::handler::{BoxFuture, BranchContext, HandlerError, Vote};

/// Rounds of each race in [`racing_calls_through_the_gate_run_one_at_a_time`].
const ROUNDS: u32 = 20;

/// Runs every two-handle case, each on a pair made by `make`: two handles
/// on the same records (clones of one store used by one process; two
/// stores on independent connections to one database).
pub async fn run_shared<S: BarrierStore>(make: impl Fn() -> (S, S)) {
    let (a, b) = make();
    a_branch_is_held_by_one_handle_at_a_time(&a, &b).await;
    let (a, b) = make();
    other_branches_do_not_wait_across_handles(&a, &b).await;
    let (a, b) = make();
    racing_calls_through_the_gate_run_one_at_a_time(&a, &b).await;
}

/// Rule: while one handle holds a branch, `enter` through the other waits,
/// and then reads what the first wrote.
pub async fn a_branch_is_held_by_one_handle_at_a_time(a: &dyn BarrierStore, b: &dyn BarrierStore) {
    let k = key(20, 1);
    let mut first = a.enter(k).await.expect("enter");
    let second = b.enter(k);
    tokio::pin!(second);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut second)
            .await
            .is_err(),
        "the second handle entered a branch the first holds"
    );
    first.put(Mark::EmptyCancelled, 1).await.expect("put");
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second handle never got the branch")
        .expect("enter");
    assert_eq!(second.record().map(|r| r.mark), Some(Mark::EmptyCancelled));
}

/// Rule: a branch held through one handle does not hold up another branch
/// through the other.
pub async fn other_branches_do_not_wait_across_handles(a: &dyn BarrierStore, b: &dyn BarrierStore) {
    let _held = a.enter(key(21, 1)).await.expect("enter");
    tokio::time::timeout(Duration::from_secs(5), b.enter(key(21, 2)))
        .await
        .expect("another branch waited for the held one")
        .expect("enter");
}

/// One branch's handler calls, checked: never two at once, and what the
/// tries hold.
#[derive(Default)]
struct Branch {
    running: AtomicBool,
    overlaps: AtomicUsize,
    runs: AtomicUsize,
    held: AtomicI64,
}

impl Branch {
    /// A handler call that takes a while (the window a second replica's
    /// call would fall into), adding `hold` to what the branch holds.
    fn call<T: Send + 'static>(
        self: &Arc<Self>,
        hold: i64,
        answer: T,
    ) -> BoxFuture<'static, Result<T, HandlerError>> {
        let me = self.clone();
        Box::pin(async move {
            if me.running.swap(true, SeqCst) {
                me.overlaps.fetch_add(1, SeqCst);
            }
            me.runs.fetch_add(1, SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            me.held.fetch_add(hold, SeqCst);
            me.running.store(false, SeqCst);
            Ok(answer)
        })
    }
}

fn ctx(k: crate::barrier::BranchKey, phase: Phase) -> BranchContext {
    BranchContext {
        gtid: k.gtid,
        branch_id: k.branch_id,
        resource: "res".into(),
        attempt: 1,
        phase,
        epoch: 1,
        traceparent: None,
    }
}

/// A phase-2 call as the coordinator makes it: repeated while the answer
/// is UNAVAILABLE.
async fn phase_two(store: &dyn BarrierStore, branch: &Arc<Branch>, cx: &BranchContext, hold: i64) {
    for _ in 0..100 {
        let gated = gate::phase_two(store, cx, b"pay", "call", branch.call(hold, ())).await;
        match gated.result {
            Ok(()) => return,
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(s) => panic!("{:?} of {:?}: {s}", cx.phase, cx.key()),
        }
    }
    panic!("{:?} of {:?} never got through", cx.phase, cx.key());
}

/// Rule, through the barrier gate: calls for one branch arriving at the
/// same time through two handles run the handler one at a time, as the
/// table says. Two confirms of a tried branch run it once; a try and a
/// cancel of a fresh branch either both run (the cancel releases what the
/// try holds) or neither does (an empty cancel, then a refused hanging
/// try); two tries run it once; two first deliveries of a message run it
/// once.
pub async fn racing_calls_through_the_gate_run_one_at_a_time(
    a: &dyn BarrierStore,
    b: &dyn BarrierStore,
) {
    for round in 0..ROUNDS {
        // confirm ‖ confirm
        let k = key(22, round);
        a.enter(k)
            .await
            .expect("enter")
            .put_tried("res", b"pay", 1)
            .await
            .expect("tried");
        let branch = Arc::new(Branch::default());
        let confirm = ctx(k, Phase::Confirm);
        tokio::join!(
            phase_two(a, &branch, &confirm, 0),
            phase_two(b, &branch, &confirm, 0)
        );
        assert_eq!(
            branch.overlaps.load(SeqCst),
            0,
            "confirm ‖ confirm overlapped"
        );
        assert_eq!(branch.runs.load(SeqCst), 1, "confirm ‖ confirm: one run");

        // try ‖ cancel, each side first in turn
        let k = key(23, round);
        let branch = Arc::new(Branch::default());
        let (first, second) = if round % 2 == 0 { (a, b) } else { (b, a) };
        let (try_, cancel) = (ctx(k, Phase::Try), ctx(k, Phase::Cancel));
        let tried = gate::phase_one(first, &try_, b"pay", "try", branch.call(1, Vote::yes()));
        let (tried, ()) = tokio::join!(tried, phase_two(second, &branch, &cancel, -1));
        assert_eq!(branch.overlaps.load(SeqCst), 0, "try ‖ cancel overlapped");
        assert_eq!(
            branch.held.load(SeqCst),
            0,
            "try ‖ cancel left a hold ({:?}, try {:?})",
            super::mark_of(a, k).await,
            tried.passage
        );
        match tried.passage {
            Passage::Ran => assert_eq!(super::mark_of(a, k).await, Some(Mark::Cancelled)),
            Passage::HangingTry => {
                assert_eq!(super::mark_of(a, k).await, Some(Mark::EmptyCancelled));
            }
            other => panic!("try ‖ cancel: the try went {other:?}"),
        }

        // try ‖ try
        let k = key(24, round);
        let branch = Arc::new(Branch::default());
        let try_ = ctx(k, Phase::Try);
        let (one, two) = tokio::join!(
            gate::phase_one(a, &try_, b"pay", "try", branch.call(1, Vote::yes())),
            gate::phase_one(b, &try_, b"pay", "try", branch.call(1, Vote::yes()))
        );
        assert_eq!(branch.overlaps.load(SeqCst), 0, "try ‖ try overlapped");
        assert_eq!(branch.runs.load(SeqCst), 1, "try ‖ try: one run");
        let mut passages = [one.passage, two.passage];
        passages.sort_by_key(|p| *p != Passage::Ran);
        assert_eq!(passages, [Passage::Ran, Passage::RepeatedTry]);

        // deliver ‖ deliver, on no record
        let k = key(25, round);
        let branch = Arc::new(Branch::default());
        let deliver = ctx(k, Phase::Deliver);
        tokio::join!(
            phase_two(a, &branch, &deliver, 0),
            phase_two(b, &branch, &deliver, 0)
        );
        assert_eq!(
            branch.overlaps.load(SeqCst),
            0,
            "deliver ‖ deliver overlapped"
        );
        assert_eq!(branch.runs.load(SeqCst), 1, "deliver ‖ deliver: one run");
        assert_eq!(super::mark_of(a, k).await, Some(Mark::Confirmed));
    }
}
