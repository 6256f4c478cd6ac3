//! The transactional-message case: deliveries through the gate on a store,
//! repeated, concurrent and failing, as the coordinator sends them (until
//! one is acknowledged).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::task::Poll;
use std::time::Duration;

use super::{key, mark_of, put};
use crate::barrier::gate::{self, Gated, Passage};
use crate::barrier::{BarrierStore, BranchKey, Mark, Phase};
use crate::handler::{BoxFuture, BranchContext, HandlerError};

/// Concurrent repeats of one delivery in
/// [`a_delivery_runs_once_until_it_succeeds`].
const REPEATS: usize = 16;

/// One delivery handler, counted: how often it ran, and whether two runs
/// ever overlapped.
#[derive(Default)]
struct Handler {
    running: AtomicBool,
    overlaps: AtomicUsize,
    runs: AtomicUsize,
}

impl Handler {
    /// A delivery that takes a while (the window a concurrent repeat
    /// would fall into) and then answers `result`.
    fn deliver(
        self: &Arc<Self>,
        result: Result<(), HandlerError>,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        let me = self.clone();
        Box::pin(async move {
            if me.running.swap(true, SeqCst) {
                me.overlaps.fetch_add(1, SeqCst);
            }
            me.runs.fetch_add(1, SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            me.running.store(false, SeqCst);
            result
        })
    }
}

fn ctx(k: BranchKey) -> BranchContext {
    BranchContext {
        gtid: k.gtid,
        branch_id: k.branch_id,
        resource: "deliveries".into(),
        attempt: 1,
        phase: Phase::Deliver,
        epoch: 1,
        traceparent: None,
    }
}

async fn deliver(
    store: &dyn BarrierStore,
    cx: &BranchContext,
    call: BoxFuture<'static, Result<(), HandlerError>>,
) -> Gated<()> {
    gate::phase_two(store, cx, b"message", "deliver", call).await
}

/// Every future of `all`, polled together on this task, in order.
async fn join_all<T>(mut all: Vec<Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut done: Vec<Option<T>> = all.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (fut, out) in all.iter_mut().zip(done.iter_mut()) {
            if out.is_none()
                && let Poll::Ready(v) = fut.as_mut().poll(cx)
            {
                *out = Some(v);
            }
        }
        if done.iter().all(Option::is_some) {
            Poll::Ready(done.iter_mut().filter_map(Option::take).collect())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Rule, through the barrier gate: a delivery runs its handler until one
/// run succeeds, and never after. Concurrent repeats of a first delivery
/// run it once (the others are answered success from the record); a
/// repeat after `Confirmed` is skipped; a failed delivery leaves `Tried`
/// (with its resource and payload, for in-doubt resolution) and the next
/// delivery runs it again; a delivery on a record that is not a
/// delivery's (a cancelled branch) is refused without running it.
pub async fn a_delivery_runs_once_until_it_succeeds(store: &dyn BarrierStore) {
    // Sixteen concurrent first deliveries.
    let k = key(30, 1);
    let cx = ctx(k);
    let handler = Arc::new(Handler::default());
    let calls = (0..REPEATS)
        .map(|_| {
            Box::pin(deliver(store, &cx, handler.deliver(Ok(()))))
                as Pin<Box<dyn Future<Output = Gated<()>> + Send + '_>>
        })
        .collect();
    let gated = join_all(calls).await;
    for g in &gated {
        assert!(g.result.is_ok(), "a concurrent delivery failed: {g:?}");
    }
    let ran = gated.iter().filter(|g| g.passage == Passage::Ran).count();
    let repeats = gated
        .iter()
        .filter(|g| g.passage == Passage::Duplicate)
        .count();
    assert_eq!(
        (ran, repeats),
        (1, REPEATS - 1),
        "one delivery ran, the others were repeats"
    );
    assert_eq!(
        handler.runs.load(SeqCst),
        1,
        "{REPEATS} deliveries: one run"
    );
    assert_eq!(handler.overlaps.load(SeqCst), 0, "deliveries overlapped");
    assert_eq!(mark_of(store, k).await, Some(Mark::Confirmed));

    // A repeat after `Confirmed`.
    let repeat = deliver(store, &cx, handler.deliver(Ok(()))).await;
    assert!(repeat.result.is_ok(), "{repeat:?}");
    assert_eq!(repeat.passage, Passage::Duplicate);
    assert_eq!(handler.runs.load(SeqCst), 1, "a repeat ran the handler");

    // A delivery that fails, then its retry.
    let k = key(30, 2);
    let cx = ctx(k);
    let handler = Arc::new(Handler::default());
    let failed = deliver(store, &cx, handler.deliver(Err(HandlerError::new("down")))).await;
    assert_eq!(failed.passage, Passage::Ran);
    let status = failed
        .result
        .expect_err("a failed delivery is not acknowledged");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        mark_of(store, k).await,
        Some(Mark::Tried),
        "a failed delivery leaves Tried"
    );
    let in_doubt = store
        .in_doubt(u64::MAX, Some(key(30, 1)), 10)
        .await
        .expect("in_doubt");
    let listed: Vec<_> = in_doubt
        .iter()
        .map(|d| (d.key, d.resource.as_str(), d.payload.as_ref()))
        .collect();
    assert_eq!(
        listed,
        vec![(k, "deliveries", &b"message"[..])],
        "the unfinished delivery is in doubt, with its resource and payload"
    );
    let retried = deliver(store, &cx, handler.deliver(Ok(()))).await;
    assert!(retried.result.is_ok(), "{retried:?}");
    assert_eq!(retried.passage, Passage::Ran, "the retry runs the handler");
    assert_eq!(handler.runs.load(SeqCst), 2);
    assert_eq!(mark_of(store, k).await, Some(Mark::Confirmed));

    // A delivery on a cancelled branch's record.
    let k = key(30, 3);
    put(store, k, Mark::Cancelled).await;
    let handler = Arc::new(Handler::default());
    let refused = deliver(store, &ctx(k), handler.deliver(Ok(()))).await;
    assert_eq!(refused.passage, Passage::Refused);
    let status = refused.result.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(handler.runs.load(SeqCst), 0);
    assert_eq!(mark_of(store, k).await, Some(Mark::Cancelled), "left alone");
}
