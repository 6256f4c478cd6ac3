//! TCC end to end: a coordinator and scripted TCC participants on loopback,
//! with the SDK's barrier in front of every handler. One rule per test.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_coordinator::log::MemLog;
use tandem_proto::v1 as pb;
use tandem_sdk::{Branch, Error, Mode, TransactionClient};
use tandem_tests::{
    Journal, RecordingLog, Script, Scripted, eventually, eventually_async, pair, start_coordinator,
};

async fn client(coord: &tandem_coordinator::RunningCoordinator) -> TransactionClient {
    TransactionClient::connect(coord.url())
        .await
        .expect("connect")
}

fn branch_states(info: &pb::TransactionInfo) -> Vec<i32> {
    info.branches.iter().map(|b| b.state).collect()
}

// Rule: all tries succeed → every branch is confirmed exactly once, by
// one-shot Submit and by Begin / Enlist / Commit alike; the try's reply
// bytes reach the business service.
#[tokio::test]
async fn all_tries_succeed_and_every_branch_is_confirmed_once() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let (a, b) = (Scripted::yes("a"), Scripted::yes("b"));
    let (pa, pb_) = (a.serve_tcc().await, b.serve_tcc().await);
    let client = client(&coord).await;

    let done = client
        .submit(Mode::Tcc, pair(&pa, &pb_))
        .await
        .expect("submit");
    assert_eq!(done.replies, vec!["ok from a", "ok from b"]);

    let gtid = client.begin(Mode::Tcc).await.expect("begin");
    let enlisted = client
        .enlist(gtid, Branch::new(pa.url(), "r", "x"))
        .await
        .expect("enlist a");
    assert_eq!(enlisted.reply, "ok from a");
    client
        .enlist(gtid, Branch::new(pb_.url(), "r", "y"))
        .await
        .expect("enlist b");
    client.commit(gtid).await.expect("commit");

    eventually("both transactions confirmed", || {
        a.counts() == (2, 2, 0) && b.counts() == (2, 2, 0)
    })
    .await;
    assert_eq!((a.held_count(), b.held_count()), (0, 0));
    let info = client.get(gtid).await.expect("get");
    assert_eq!(info.state, pb::TxState::Committed as i32);
    let confirmed = pb::BranchState::Confirmed as i32;
    assert_eq!(branch_states(&info), vec![confirmed, confirmed]);
}

// Rule: one try fails → every enlisted branch is cancelled and none is
// confirmed. The failed try's cancel reaches its handler (the try may have
// reserved something); a try that voted no holds nothing, so the barrier
// answers its cancel without calling the handler.
#[tokio::test]
async fn a_failed_try_cancels_every_enlisted_branch() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let ok = Scripted::yes("ok");
    let broken = Scripted::new(
        "broken",
        Script {
            fail_phase_one: Some("disk full".into()),
            ..Script::default()
        },
        None,
    );
    let no = Scripted::new(
        "no",
        Script {
            vote_no: Some("sold out".into()),
            ..Script::default()
        },
        None,
    );
    let (p_ok, p_broken, p_no) = (
        ok.serve_tcc().await,
        broken.serve_tcc().await,
        no.serve_tcc().await,
    );
    let client = client(&coord).await;

    let err = client
        .submit(Mode::Tcc, pair(&p_ok, &p_broken))
        .await
        .expect_err("must abort");
    let Error::Aborted { gtid, reason, .. } = err else {
        panic!("{err:?}");
    };
    assert!(reason.contains("disk full"), "{reason}");
    eventually("both branches cancelled", || {
        ok.counts() == (1, 0, 1) && broken.counts() == (1, 0, 1)
    })
    .await;
    let info = client.get(gtid.expect("gtid")).await.expect("get");
    let cancelled = pb::BranchState::Cancelled as i32;
    assert_eq!(branch_states(&info), vec![cancelled, cancelled]);

    // Interactive: the second enlist votes no; the first branch is cancelled.
    let gtid = client.begin(Mode::Tcc).await.expect("begin");
    client
        .enlist(gtid, Branch::new(p_ok.url(), "r", "x"))
        .await
        .expect("enlist ok");
    let err = client
        .enlist(gtid, Branch::new(p_no.url(), "r", "y"))
        .await
        .expect_err("no vote aborts");
    assert!(
        matches!(&err, Error::Aborted { reason, .. } if reason.contains("sold out")),
        "{err:?}"
    );
    eventually("transaction aborted", || ok.counts() == (2, 0, 2)).await;
    let info = client.get(gtid).await.expect("get");
    assert_eq!(info.state, pb::TxState::Aborted as i32);
    assert_eq!(branch_states(&info), vec![cancelled, cancelled]);
    assert_eq!(
        no.counts(),
        (1, 0, 0),
        "a no holds nothing: its cancel is absorbed"
    );
    assert_eq!((ok.held_count(), no.held_count()), (0, 0));
    assert_eq!(
        ok.commits.load(Ordering::SeqCst) + no.commits.load(Ordering::SeqCst),
        0
    );
}

// Rule: a try that times out at the coordinator but completes later at the
// participant is still cancelled, and its reservation released: the cancel
// waits behind the running try (same branch, one call at a time) and the
// coordinator retries it until it gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_that_outlives_its_timeout_is_cancelled_after_it_completes() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await; // call timeout 500 ms
    let fast = Scripted::yes("fast");
    let slow = Scripted::new(
        "slow",
        Script {
            prepare_delay: Duration::from_millis(1500),
            ..Script::default()
        },
        None,
    );
    let (pf, ps) = (fast.serve_tcc().await, slow.serve_tcc().await);
    let client = client(&coord).await;
    let err = client
        .submit(Mode::Tcc, pair(&pf, &ps))
        .await
        .expect_err("must abort");
    assert!(
        matches!(&err, Error::Aborted { reason, .. } if reason.contains("no reply within")),
        "{err:?}"
    );
    // The slow try finishes after the abort and reserves; the cancel must
    // then release it.
    eventually("the slow try completed", || {
        slow.prepares.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually("the late reservation released", || {
        slow.counts() == (1, 0, 1) && slow.held_count() == 0
    })
    .await;
    assert_eq!(fast.counts(), (1, 0, 1));
    assert_eq!(fast.held_count(), 0);
}

// Rule: a rollback, or the global deadline, cancels every enlisted branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_and_deadline_cancel_every_branch() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let (a, b) = (Scripted::yes("a"), Scripted::yes("b"));
    let (pa, pb_) = (a.serve_tcc().await, b.serve_tcc().await);
    let client = client(&coord).await;

    let gtid = client.begin(Mode::Tcc).await.expect("begin");
    for p in [&pa, &pb_] {
        client
            .enlist(gtid, Branch::new(p.url(), "r", "x"))
            .await
            .expect("enlist");
    }
    client
        .rollback(gtid, "customer left")
        .await
        .expect("rollback");
    eventually("rollback cancelled both", || {
        a.counts() == (1, 0, 1) && b.counts() == (1, 0, 1)
    })
    .await;

    let gtid = client
        .begin_with_timeout(Mode::Tcc, Some(Duration::from_millis(300)))
        .await
        .expect("begin");
    client
        .enlist(gtid, Branch::new(pa.url(), "r", "x"))
        .await
        .expect("enlist");
    eventually("deadline cancelled the branch", || a.counts() == (2, 0, 2)).await;
    eventually_async("the record says aborted", || async {
        let info = client.get(gtid).await.expect("get");
        info.state == pb::TxState::Aborted as i32
    })
    .await;
    let info = client.get(gtid).await.expect("get");
    assert!(info.reason.contains("deadline"), "{}", info.reason);
    assert_eq!((a.held_count(), b.held_count()), (0, 0));
}

// Rule: an enlisted branch is on disk before its participant hears of it,
// so a coordinator crash after the try still leaves a record to cancel from.
#[tokio::test]
async fn an_enlisted_branch_is_forced_before_its_try() {
    let journal = Journal::default();
    let coord = start_coordinator(Arc::new(RecordingLog::new(journal.clone()))).await;
    let a = Scripted::new("a", Script::default(), Some(journal.clone()));
    let pa = a.serve_tcc().await;
    let client = client(&coord).await;
    let gtid = client.begin(Mode::Tcc).await.expect("begin");
    client
        .enlist(gtid, Branch::new(pa.url(), "r", "x"))
        .await
        .expect("enlist");
    let forced = journal.position("forced").expect("the branch was forced");
    let tried = journal.position("prepare:a").expect("the try ran");
    assert!(forced < tried, "{:?}", journal.entries());
}

// Rule (in-doubt resolution): a participant holding a tried branch that
// hears nothing asks the coordinator. A gtid the coordinator never
// recorded is cancelled (presumed abort); an undecided one is left alone
// (PENDING) until the coordinator decides and calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_branches_ask_the_coordinator() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let p = Scripted::yes("p");
    let server = p.serve_resolving(true, &coord.url()).await;

    // A try for a transaction the coordinator never heard of.
    let mut driver = tandem_proto::v1::participant_client::ParticipantClient::connect(server.url())
        .await
        .expect("connect");
    let orphan = uuid::Uuid::now_v7();
    let vote = driver
        .r#try(tandem_proto::v1::BranchRequest {
            gtid: orphan.to_string(),
            branch_id: 1,
            resource: "r".into(),
            payload: "x".into(),
            attempt: 1,
            epoch: 1,
            mode: 0,
        })
        .await
        .expect("try")
        .into_inner();
    assert!(vote.yes);
    eventually("the orphan is cancelled", || p.counts() == (1, 0, 1)).await;
    assert_eq!(p.held_count(), 0);

    // An undecided transaction: the participant asks, hears PENDING, waits.
    let client = client(&coord).await;
    let gtid = client.begin(Mode::Tcc).await.expect("begin");
    client
        .enlist(gtid, Branch::new(server.url(), "r", "y"))
        .await
        .expect("enlist");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        p.counts(),
        (2, 0, 1),
        "an undecided branch must not be resolved"
    );
    client.commit(gtid).await.expect("commit");
    eventually("confirmed once", || p.counts() == (2, 1, 1)).await;
}
