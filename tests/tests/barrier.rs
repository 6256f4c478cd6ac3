//! The barrier, driven by a test that calls the participant service
//! directly, as a misbehaving network would: repeats, disorder, concurrency,
//! restarts, and retention. One rule per test.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_proto::v1::{BranchRequest, VoteResponse};
use tandem_sdk::barrier::{
    BarrierStore, BranchKey, Mark, MemBarrier, Retention, SledBarrier, conformance,
};
use tandem_sdk::{BranchContext, HandlerError, ParticipantServer, RunningParticipant, Tcc, Vote};
use tandem_tests::{Script, Scripted, eventually, spawn};
use tonic::transport::Channel;
use uuid::Uuid;

async fn driver(p: &RunningParticipant) -> ParticipantClient<Channel> {
    ParticipantClient::connect(p.url()).await.expect("connect")
}

fn req(gtid: Uuid, branch: u32) -> BranchRequest {
    BranchRequest {
        gtid: gtid.to_string(),
        branch_id: branch,
        resource: "r".into(),
        payload: "x".into(),
        attempt: 1,
        epoch: 1,
        mode: 0,
    }
}

async fn try_(d: &mut ParticipantClient<Channel>, gtid: Uuid, branch: u32) -> VoteResponse {
    d.r#try(req(gtid, branch)).await.expect("try").into_inner()
}

async fn confirm(
    d: &mut ParticipantClient<Channel>,
    gtid: Uuid,
    branch: u32,
) -> Result<(), tonic::Status> {
    d.confirm(req(gtid, branch)).await.map(drop)
}

async fn cancel(
    d: &mut ParticipantClient<Channel>,
    gtid: Uuid,
    branch: u32,
) -> Result<(), tonic::Status> {
    d.cancel(req(gtid, branch)).await.map(drop)
}

// Rule (idempotency): a repeated confirm, cancel, commit or rollback of the
// same branch succeeds without calling the handler again.
#[tokio::test]
async fn repeated_phase_two_calls_run_the_handler_once() {
    let tcc = Scripted::yes("tcc");
    let two_phase = Scripted::yes("2pc");
    let (pt, p2) = (tcc.serve_tcc().await, two_phase.serve().await);
    let (mut dt, mut d2) = (driver(&pt).await, driver(&p2).await);
    let gtid = Uuid::now_v7();

    assert!(try_(&mut dt, gtid, 1).await.yes);
    assert!(try_(&mut dt, gtid, 2).await.yes);
    for _ in 0..3 {
        confirm(&mut dt, gtid, 1).await.expect("confirm");
        cancel(&mut dt, gtid, 2).await.expect("cancel");
    }
    assert_eq!(tcc.counts(), (2, 1, 1));

    for b in [1, 2] {
        assert!(
            d2.prepare(req(gtid, b))
                .await
                .expect("prepare")
                .into_inner()
                .yes
        );
    }
    for _ in 0..3 {
        d2.commit(req(gtid, 1)).await.expect("commit");
        d2.rollback(req(gtid, 2)).await.expect("rollback");
    }
    assert_eq!(two_phase.counts(), (2, 1, 1));
}

// Rules (empty rollback, anti-hanging): a cancel for a branch whose try
// never ran succeeds without calling the handler and is remembered; the try
// that arrives after it is refused without calling the handler, so nothing
// is reserved that no one would ever release. The same disorder DTM's
// barrier tests cover, here with the try delayed by the test.
#[tokio::test]
async fn cancel_before_try_is_empty_and_the_late_try_is_refused() {
    let p = Scripted::yes("p");
    let server = p.serve_tcc().await;
    let mut d = driver(&server).await;
    let gtid = Uuid::now_v7();

    cancel(&mut d, gtid, 1)
        .await
        .expect("empty cancel succeeds");
    assert_eq!(p.counts(), (0, 0, 0), "handler's cancel not called");
    cancel(&mut d, gtid, 1).await.expect("repeat succeeds too");

    let late = try_(&mut d, gtid, 1).await;
    assert!(!late.yes);
    assert!(
        late.reason.contains("cancelled before the try arrived"),
        "{}",
        late.reason
    );
    assert_eq!(p.counts(), (0, 0, 0), "handler's try not called");
    assert_eq!(p.held_count(), 0);

    // And the branch can never be confirmed.
    let err = confirm(&mut d, gtid, 1).await.expect_err("confirm refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(p.counts(), (0, 0, 0));
}

// Rule (concurrency): sixteen confirms of one branch at once run the
// handler once; every caller is told success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_confirms_run_the_handler_once() {
    let p = Scripted::new(
        "p",
        Script {
            phase_two_delay: Duration::from_millis(50),
            ..Script::default()
        },
        None,
    );
    let server = p.serve_tcc().await;
    let mut d = driver(&server).await;
    let gtid = Uuid::now_v7();
    assert!(try_(&mut d, gtid, 1).await.yes);

    let calls: Vec<_> = (0..16)
        .map(|_| {
            let mut d = d.clone();
            tokio::spawn(async move { confirm(&mut d, gtid, 1).await })
        })
        .collect();
    for call in calls {
        call.await.expect("task").expect("confirm");
    }
    assert_eq!(p.commits.load(Ordering::SeqCst), 1);
    assert_eq!(p.held_count(), 0);
}

/// Opens a sled barrier, retrying while the previous owner in this process
/// is still letting go of the directory.
async fn reopen(dir: &std::path::Path) -> SledBarrier {
    for _ in 0..200 {
        if let Ok(b) = SledBarrier::open(dir) {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    SledBarrier::open(dir).expect("reopen barrier")
}

// Rule: the sled barrier survives a participant restart. After the
// process's server and store are gone and the directory is reopened, a
// repeated confirm is still a no-op and a late try after an empty cancel
// is still refused.
#[tokio::test]
async fn sled_barrier_survives_a_participant_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gtid = Uuid::now_v7();
    {
        let p = Scripted::yes("before");
        let server = spawn(
            ParticipantServer::new()
                .barrier(SledBarrier::open(dir.path()).expect("open"))
                .tcc("r", p.clone()),
        )
        .await;
        let mut d = driver(&server).await;
        assert!(try_(&mut d, gtid, 1).await.yes);
        confirm(&mut d, gtid, 1).await.expect("confirm");
        cancel(&mut d, gtid, 2).await.expect("empty cancel");
        assert_eq!(p.counts(), (1, 1, 0));
        drop(d);
        server.shutdown().await.expect("shutdown");
    }
    let p = Scripted::yes("after");
    let server = spawn(
        ParticipantServer::new()
            .barrier(reopen(dir.path()).await)
            .tcc("r", p.clone()),
    )
    .await;
    let mut d = driver(&server).await;
    confirm(&mut d, gtid, 1)
        .await
        .expect("repeated confirm succeeds");
    let late = try_(&mut d, gtid, 2).await;
    assert!(
        !late.yes,
        "late try after an empty cancel must stay refused"
    );
    assert_eq!(p.counts(), (0, 0, 0), "no handler ran after the restart");
}

// Rule: retention removes finished records (confirmed, cancelled, empty
// cancels, refused tries) and never a branch still waiting for its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_finished_records() {
    let store = MemBarrier::new();
    let p = Scripted::yes("p");
    let server = spawn(
        ParticipantServer::new()
            .barrier(store.clone())
            .retention(Retention {
                keep: Duration::ZERO,
                interval: Duration::from_millis(20),
                batch: 2,
            })
            .tcc("r", p.clone()),
    )
    .await;
    let mut d = driver(&server).await;
    let gtid = Uuid::now_v7();
    assert!(try_(&mut d, gtid, 1).await.yes);
    confirm(&mut d, gtid, 1).await.expect("confirm");
    assert!(try_(&mut d, gtid, 2).await.yes);
    cancel(&mut d, gtid, 2).await.expect("cancel");
    cancel(&mut d, gtid, 3).await.expect("empty cancel");
    assert!(try_(&mut d, gtid, 4).await.yes); // waiting for its outcome

    eventually("finished records removed", || store.len() == 1).await;
    // The waiting branch kept its record: its confirm runs the handler.
    confirm(&mut d, gtid, 4)
        .await
        .expect("confirm after sweeps");
    assert_eq!(p.commits.load(Ordering::SeqCst), 2);
}

// The BarrierStore contract, on the sled store.
#[tokio::test]
async fn sled_barrier_passes_the_conformance_suite() {
    let root = tempfile::tempdir().expect("tempdir");
    let n = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_all(|| {
        let dir = root
            .path()
            .join(n.fetch_add(1, Ordering::SeqCst).to_string());
        SledBarrier::open(dir).expect("open")
    })
    .await;
}

// The same, on two handles of one sled store (one process owns a sled
// directory: its handles are clones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_barrier_passes_the_shared_conformance_suite() {
    let root = tempfile::tempdir().expect("tempdir");
    let n = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_shared(|| {
        let dir = root
            .path()
            .join(n.fetch_add(1, Ordering::SeqCst).to_string());
        let store = SledBarrier::open(dir).expect("open");
        (store.clone(), store)
    })
    .await;
}

/// A TCC handler keeping its state in the barrier's sled database, written
/// in the same transaction as the barrier record.
struct Stock {
    barrier: SledBarrier,
    items: sled::Tree,
}

impl Tcc for Stock {
    async fn try_(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        let key = format!("held:{}:{}", ctx.gtid, ctx.branch_id);
        self.barrier.transaction(ctx, &self.items, |items| {
            items.insert(key.as_bytes(), payload)?;
            Ok(Vote::yes())
        })
    }
    async fn confirm(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        let key = format!("held:{}:{}", ctx.gtid, ctx.branch_id);
        self.barrier.transaction(ctx, &self.items, |items| {
            let held = items.remove(key.as_bytes())?;
            if let Some(v) = held {
                items.insert(format!("sold:{}", ctx.gtid).as_bytes(), v)?;
            }
            Ok(())
        })
    }
    async fn cancel(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        let key = format!("held:{}:{}", ctx.gtid, ctx.branch_id);
        self.barrier.transaction(ctx, &self.items, |items| {
            items.remove(key.as_bytes())?;
            Ok(())
        })
    }
}

// Rule: with SledBarrier::transaction the business write and the barrier
// record commit together: after a confirm both are there (and survive a
// reopen), and a confirm repeated after the reopen changes nothing.
#[tokio::test]
async fn business_writes_commit_with_the_barrier_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gtid = Uuid::now_v7();
    {
        let barrier = SledBarrier::open(dir.path()).expect("open");
        let items = barrier.db().open_tree("items").expect("tree");
        let server = spawn(
            ParticipantServer::new()
                .barrier(barrier.clone())
                .tcc("r", Stock { barrier, items }),
        )
        .await;
        let mut d = driver(&server).await;
        assert!(try_(&mut d, gtid, 1).await.yes);
        confirm(&mut d, gtid, 1).await.expect("confirm");
        drop(d);
        server.shutdown().await.expect("shutdown");
    }
    let barrier = reopen(dir.path()).await;
    let items = barrier.db().open_tree("items").expect("tree");
    let sold = format!("sold:{gtid}");
    assert_eq!(items.get(&sold).expect("get").as_deref(), Some(&b"x"[..]));
    assert_eq!(
        items.len(),
        1,
        "the hold was consumed in the same transaction"
    );
    let entry = barrier
        .enter(BranchKey { gtid, branch_id: 1 })
        .await
        .expect("enter");
    assert_eq!(entry.record().map(|r| r.mark), Some(Mark::Confirmed));
    drop(entry);

    let server = spawn(ParticipantServer::new().barrier(barrier.clone()).tcc(
        "r",
        Stock {
            barrier,
            items: items.clone(),
        },
    ))
    .await;
    let mut d = driver(&server).await;
    confirm(&mut d, gtid, 1).await.expect("repeat");
    assert_eq!(items.len(), 1);
}

// Rule (fencing): every call carries the coordinator's epoch for the
// transaction; once a branch has seen a call from a newer epoch (another
// coordinator took the transaction over), a call from an older one is
// refused without running the handler, in each phase.
#[tokio::test]
async fn calls_from_a_former_owner_are_refused_by_their_epoch() {
    let tcc = Scripted::yes("tcc");
    let p = tcc.serve_tcc().await;
    let mut d = driver(&p).await;
    let gtid = Uuid::now_v7();
    let at = |branch, epoch| BranchRequest {
        epoch,
        ..req(gtid, branch)
    };

    // Branch 1: tried by the first owner, confirmed by its successor; the
    // first owner's cancel then arrives and is refused.
    assert!(d.r#try(at(1, 1)).await.expect("try").into_inner().yes);
    d.confirm(at(1, 2)).await.expect("confirm at epoch 2");
    let refused = d.cancel(at(1, 1)).await.expect_err("stale cancel");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("epoch"), "{refused:?}");
    assert!(!tandem_proto::rpc::is_permanent(&refused));

    // Branch 2: the successor cancels first (nothing tried); the first
    // owner's late try is a no vote.
    d.cancel(at(2, 2)).await.expect("empty cancel at epoch 2");
    let late = d.r#try(at(2, 1)).await.expect("answered").into_inner();
    assert!(!late.yes && late.reason.contains("epoch"), "{late:?}");

    // Branch 4: tried by the successor, whose cancel has not come yet; the
    // first owner's cancel is refused for its epoch alone (the table
    // would run it).
    assert!(d.r#try(at(4, 2)).await.expect("try").into_inner().yes);
    let refused = d
        .cancel(at(4, 1))
        .await
        .expect_err("stale cancel of a tried branch");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    // Branch 3: the same epoch, and a newer one, run as always.
    assert!(d.r#try(at(3, 2)).await.expect("try").into_inner().yes);
    d.cancel(at(3, 3)).await.expect("cancel at a newer epoch");

    // The handler ran try 1, confirm 1, try 4, try 3, cancel 3: nothing
    // stale.
    assert_eq!(tcc.counts(), (3, 1, 1));
}
