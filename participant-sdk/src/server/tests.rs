//! Dispatch of the transactional-message calls, `Deliver` and `Check`,
//! through the `Participant` trait as the coordinator's calls arrive.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use tandem_proto::v1 as pb;
use tandem_proto::v1::participant_server::Participant;
use tonic::{Code, Request};

use super::{ParticipantServer, ParticipantService};
use crate::handler::{BranchContext, HandlerError, Message, MessageCheck};
use crate::{Gtid, Phase};

/// Counts deliveries; fails the first `failures` of them.
#[derive(Default)]
struct Points {
    runs: AtomicUsize,
    failures: usize,
}

impl Message for Points {
    async fn deliver(&self, ctx: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        assert_eq!(ctx.phase, Phase::Deliver);
        assert_eq!(payload, b"customer-7:+80");
        let run = self.runs.fetch_add(1, SeqCst);
        if run < self.failures {
            return Err(HandlerError::new("ledger down"));
        }
        Ok(())
    }
}

/// A back-check with a fixed answer; `None`: not known.
struct Orders(Option<bool>);

impl MessageCheck for Orders {
    async fn check(&self, ctx: &BranchContext, payload: &[u8]) -> Result<bool, HandlerError> {
        assert_eq!(ctx.branch_id, 1);
        assert_eq!(payload, b"order-7");
        self.0
            .ok_or_else(|| HandlerError::new("the database is unreachable"))
    }
}

fn request(
    gtid: Gtid,
    branch_id: u32,
    resource: &str,
    payload: &[u8],
) -> Request<pb::BranchRequest> {
    Request::new(pb::BranchRequest {
        gtid: gtid.to_string(),
        branch_id,
        resource: resource.into(),
        payload: bytes::Bytes::copy_from_slice(payload),
        attempt: 1,
        epoch: 1,
        mode: 0,
    })
}

fn service(points: Arc<Points>) -> ParticipantService {
    ParticipantServer::new()
        .message("points", points)
        .check("orders-check", Orders(Some(true)))
        .check("lost-orders-check", Orders(Some(false)))
        .check("unknown-orders-check", Orders(None))
        .into_participant()
        .expect("one handler per resource")
}

// Rule: a delivery is acknowledged until its handler succeeded once;
// repeats after that are acknowledged without running it again.
#[tokio::test]
async fn deliveries_run_the_handler_until_one_succeeds() {
    let points = Arc::new(Points {
        failures: 1,
        ..Points::default()
    });
    let svc = service(points.clone());
    let gtid = Gtid::now_v7();
    let deliver = || request(gtid, 2, "points", b"customer-7:+80");
    let failed = svc
        .deliver(deliver())
        .await
        .expect_err("the handler failed");
    assert_eq!(failed.code(), Code::Unavailable, "retried: {failed:?}");
    svc.deliver(deliver()).await.expect("the retry succeeds");
    svc.deliver(deliver())
        .await
        .expect("a repeat is acknowledged");
    svc.deliver(deliver())
        .await
        .expect("a repeat is acknowledged");
    assert_eq!(
        points.runs.load(SeqCst),
        2,
        "the failed run and one success"
    );
}

// Rule: sixteen concurrent deliveries of one branch run the handler once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_run_the_handler_once() {
    let points = Arc::new(Points::default());
    let svc = service(points.clone());
    let gtid = Gtid::now_v7();
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                svc.deliver(request(gtid, 2, "points", b"customer-7:+80"))
                    .await
            })
        })
        .collect();
    for call in calls {
        call.await.expect("task").expect("acknowledged");
    }
    assert_eq!(points.runs.load(SeqCst), 1);
}

// Rule: the back-check's answer is the vote: committed is yes, not
// committed is no, and not known is UNAVAILABLE (asked again), never a no.
#[tokio::test]
async fn a_check_answers_yes_no_or_unavailable() {
    let svc = service(Arc::new(Points::default()));
    let gtid = Gtid::now_v7();
    let yes = svc
        .check(request(gtid, 1, "orders-check", b"order-7"))
        .await
        .expect("answered")
        .into_inner();
    assert!(yes.yes, "{yes:?}");
    let no = svc
        .check(request(gtid, 1, "lost-orders-check", b"order-7"))
        .await
        .expect("answered")
        .into_inner();
    assert!(!no.yes && no.reason.contains("did not commit"), "{no:?}");
    let unknown = svc
        .check(request(gtid, 1, "unknown-orders-check", b"order-7"))
        .await
        .expect_err("not known");
    assert_eq!(unknown.code(), Code::Unavailable, "{unknown:?}");
}

// Rule: a resource answers only its own protocol's calls: a delivery to a
// check, a check of a delivery handler and a try of either are
// UNIMPLEMENTED, before anything runs.
#[tokio::test]
async fn message_resources_answer_only_their_own_calls() {
    let points = Arc::new(Points::default());
    let svc = service(points.clone());
    let gtid = Gtid::now_v7();
    let wrong = [
        svc.deliver(request(gtid, 2, "orders-check", b"customer-7:+80"))
            .await
            .map(drop),
        svc.check(request(gtid, 1, "points", b"order-7"))
            .await
            .map(drop),
        svc.r#try(request(gtid, 2, "points", b"customer-7:+80"))
            .await
            .map(drop),
        svc.confirm(request(gtid, 2, "points", b"customer-7:+80"))
            .await
            .map(drop),
    ];
    for answer in wrong {
        assert_eq!(answer.expect_err("refused").code(), Code::Unimplemented);
    }
    assert_eq!(points.runs.load(SeqCst), 0);
}

/// A delivery handler writing its change in the barrier's sled database,
/// in the barrier record's transaction.
#[cfg(feature = "sled")]
struct Ledger {
    barrier: crate::SledBarrier,
    credits: sled::Tree,
    runs: AtomicUsize,
}

#[cfg(feature = "sled")]
impl Message for Ledger {
    async fn deliver(&self, ctx: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
        self.runs.fetch_add(1, SeqCst);
        let key = format!("{}:{}", ctx.gtid, ctx.branch_id);
        self.barrier.transaction(ctx, &self.credits, |credits| {
            credits.insert(key.as_bytes(), payload)?;
            Ok(())
        })
    }
}

// Rule: a delivery writing in SledBarrier::transaction finds the `Tried`
// record the server stored before calling it and commits `Confirmed` with
// its change; a repeat is then not run.
#[cfg(feature = "sled")]
#[tokio::test]
async fn a_sled_delivery_commits_its_change_with_the_record() {
    use crate::barrier::{BarrierStore, Mark};

    let dir = std::env::temp_dir().join(format!("tandem-sdk-delivery-{}", Gtid::now_v7()));
    let barrier = crate::SledBarrier::open(&dir).expect("open");
    let ledger = Arc::new(Ledger {
        barrier: barrier.clone(),
        credits: barrier.db().open_tree("credits").expect("tree"),
        runs: AtomicUsize::new(0),
    });
    let svc = ParticipantServer::new()
        .barrier(barrier.clone())
        .message("points", ledger.clone())
        .into_participant()
        .expect("service");
    let gtid = Gtid::now_v7();
    for _ in 0..3 {
        svc.deliver(request(gtid, 2, "points", b"customer-7:+80"))
            .await
            .expect("acknowledged");
    }
    assert_eq!(ledger.runs.load(SeqCst), 1, "repeats are not run");
    let credit = ledger
        .credits
        .get(format!("{gtid}:2"))
        .expect("get")
        .expect("the change is there");
    assert_eq!(&credit[..], b"customer-7:+80");
    let key = crate::barrier::BranchKey { gtid, branch_id: 2 };
    let entry = barrier.enter(key).await.expect("enter");
    assert_eq!(entry.record().map(|r| r.mark), Some(Mark::Confirmed));
    drop(entry);
    assert!(
        barrier
            .in_doubt(u64::MAX, None, 10)
            .await
            .expect("in_doubt")
            .is_empty(),
        "a finished delivery is not in doubt"
    );
    drop((svc, ledger, barrier));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A saga step that counts its actions.
#[derive(Default)]
struct Step(AtomicUsize);

impl crate::handler::Saga for Step {
    async fn action(&self, _: &BranchContext, _: &[u8]) -> Result<crate::Vote, HandlerError> {
        self.0.fetch_add(1, SeqCst);
        Ok(crate::Vote::yes())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
}

// A saga step's action commits at once: a Try from a TCC transaction
// (which would never compensate it) is refused before it runs; a saga's,
// or one from a coordinator that does not send the mode, runs.
#[tokio::test]
async fn a_saga_step_refuses_a_tcc_transactions_try() {
    let step = Arc::new(Step::default());
    let service = ParticipantServer::new()
        .saga("book", step.clone())
        .into_participant()
        .expect("one handler per resource");
    let tried = |mode: pb::Mode| {
        let mut req = request(Gtid::now_v7(), 1, "book", b"");
        req.get_mut().mode = mode as i32;
        req
    };
    let refused = service
        .r#try(tried(pb::Mode::Tcc))
        .await
        .expect_err("a TCC try of a saga step");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    assert_eq!(step.0.load(SeqCst), 0, "the action ran");
    for mode in [pb::Mode::Saga, pb::Mode::Unspecified] {
        let vote = service.r#try(tried(mode)).await.expect("try").into_inner();
        assert!(vote.yes, "{mode:?}");
    }
    assert_eq!(step.0.load(SeqCst), 2);
}
