//! 2PC end to end: a real coordinator and real participant servers on
//! 127.0.0.1:0, over the in-memory log or a real sled directory.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_coordinator::log::{MemLog, SledLog};
use tandem_proto::v1 as pb;
use tandem_sdk::{Branch, Error, Mode, TransactionClient};
use tandem_tests::{Journal, RecordingLog, Script, Scripted, eventually, pair, start_coordinator};

// Rule: all branches vote yes → every participant committed exactly once,
// the transaction is COMMITTED (one-shot, on a real sled log).
#[tokio::test]
async fn all_yes_commits_everywhere_one_shot() {
    let dir = tempfile::tempdir().expect("dir");
    let coord = start_coordinator(Arc::new(SledLog::open(dir.path()).expect("log"))).await;
    let (a, b) = (Scripted::yes("a"), Scripted::yes("b"));
    let (pa, pb_) = (a.serve().await, b.serve().await);
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");

    let done = client
        .submit(Mode::TwoPhase, pair(&pa, &pb_))
        .await
        .expect("submit");
    assert!(done.complete);
    assert_eq!(done.replies, vec!["ok from a", "ok from b"]);
    assert_eq!(a.counts(), (1, 1, 0));
    assert_eq!(b.counts(), (1, 1, 0));
    let info = client.get(done.gtid).await.expect("get");
    assert_eq!(info.state, pb::TxState::Committed as i32);
    assert!(
        info.branches
            .iter()
            .all(|b| b.state == pb::BranchState::Committed as i32)
    );
    assert!(
        coord.coordinator.log_stats().flushes >= 1,
        "the decision went through fdatasync"
    );
}

// Rule: the interactive path (Begin, Enlist ×2, Commit) commits every branch
// and hands each prepare's reply back to the business service.
#[tokio::test]
async fn all_yes_commits_everywhere_interactive() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let (a, b) = (Scripted::yes("a"), Scripted::yes("b"));
    let (pa, pb_) = (a.serve().await, b.serve().await);
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");

    let gtid = client.begin(Mode::TwoPhase).await.expect("begin");
    let first = client
        .enlist(gtid, Branch::new(pa.url(), "r", "x"))
        .await
        .expect("enlist a");
    assert_eq!(
        (first.branch_id, first.reply.as_ref()),
        (1, b"ok from a".as_ref())
    );
    let second = client
        .enlist(gtid, Branch::new(pb_.url(), "r", "y"))
        .await
        .expect("enlist b");
    assert_eq!(second.branch_id, 2);
    assert_eq!(
        a.counts(),
        (1, 0, 0),
        "prepare ran at enlist, nothing committed yet"
    );
    let out = client.commit(gtid).await.expect("commit");
    assert!(out.complete);
    assert_eq!(a.counts(), (1, 1, 0));
    assert_eq!(b.counts(), (1, 1, 0));
    // Commit is idempotent.
    assert!(client.commit(gtid).await.expect("commit again").complete);
    assert_eq!(a.counts(), (1, 1, 0));
}

// Rule: one branch votes no → every prepared branch rolled back, none
// committed, and the participant's reason reaches the client.
#[tokio::test]
async fn one_no_vote_rolls_back_everywhere() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let a = Scripted::yes("a");
    let b = Scripted::new(
        "b",
        Script {
            vote_no: Some("insufficient funds".into()),
            ..Script::default()
        },
        None,
    );
    let (pa, pb_) = (a.serve().await, b.serve().await);
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");

    let err = client
        .submit(Mode::TwoPhase, pair(&pa, &pb_))
        .await
        .expect_err("must abort");
    let Error::Aborted {
        gtid: Some(gtid),
        reason,
        ..
    } = err
    else {
        panic!("not an abort: {err:?}")
    };
    assert!(reason.contains("insufficient funds"), "{reason}");
    assert_eq!(a.counts(), (1, 0, 1), "the prepared branch was rolled back");
    assert_eq!(
        b.counts(),
        (1, 0, 0),
        "the branch that voted no holds nothing"
    );
    let info = client.get(gtid).await.expect("get");
    assert_eq!(info.state, pb::TxState::Aborted as i32);
    assert!(info.reason.contains("insufficient funds"));

    // Interactive: the no arrives at enlist; the earlier branch is rolled back.
    let gtid = client.begin(Mode::TwoPhase).await.expect("begin");
    client
        .enlist(gtid, Branch::new(pa.url(), "r", "x"))
        .await
        .expect("enlist a");
    let err = client
        .enlist(gtid, Branch::new(pb_.url(), "r", "y"))
        .await
        .expect_err("no");
    assert!(
        matches!(&err, Error::Aborted { reason, .. } if reason.contains("insufficient funds")),
        "{err:?}"
    );
    assert_eq!(a.counts(), (2, 0, 2));
}

// Rule: a participant that cannot be reached in phase 1 → abort everywhere.
#[tokio::test]
async fn unreachable_participant_aborts_everywhere() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let a = Scripted::yes("a");
    let pa = a.serve().await;
    // A port that was free a moment ago: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let err = client
        .submit(
            Mode::TwoPhase,
            vec![Branch::new(pa.url(), "r", "x"), Branch::new(dead, "r", "y")],
        )
        .await
        .expect_err("must abort");
    let Error::Aborted {
        gtid: Some(gtid),
        reason,
        ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert!(reason.contains("failed in phase 1"), "{reason}");
    assert_eq!(a.counts(), (1, 0, 1));
    // Its connection was refused, so its prepare never ran and phase 1 is
    // never sent twice: it needs no rollback (DESIGN.md rule 3a), and the
    // abort finishes instead of retrying a rollback nobody can answer.
    let info = client.get(gtid).await.expect("get");
    assert_eq!(info.state, pb::TxState::Aborted as i32);
    assert_eq!(info.branches[1].state, pb::BranchState::RolledBack as i32);
    assert_eq!(info.branches[1].attempts, 0, "no rollback was sent");
}

// Rule: a participant past its per-call deadline in phase 1 → abort
// everywhere; the slow branch is rolled back once its call returns.
#[tokio::test]
async fn participant_past_its_deadline_aborts_everywhere() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await; // call timeout 500 ms
    let a = Scripted::yes("a");
    let slow = Scripted::new(
        "slow",
        Script {
            prepare_delay: Duration::from_secs(2),
            ..Script::default()
        },
        None,
    );
    let (pa, ps) = (a.serve().await, slow.serve().await);
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let err = client
        .submit(Mode::TwoPhase, pair(&pa, &ps))
        .await
        .expect_err("must abort");
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "waited for the slow participant"
    );
    assert!(
        matches!(&err, Error::Aborted { reason, .. } if reason.contains("no reply within")),
        "{err:?}"
    );
    assert_eq!(a.counts(), (1, 0, 1));
    eventually("slow branch rolled back", || {
        slow.rollbacks.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(slow.commits.load(Ordering::SeqCst), 0);
}

// Rule 4: a participant failing phase 2 and coming back → committed
// eventually, with the retries visible in the record.
#[tokio::test]
async fn phase_two_failure_is_retried_until_committed() {
    let coord = start_coordinator(Arc::new(MemLog::new())).await;
    let a = Scripted::yes("a");
    let flaky = Scripted::new(
        "flaky",
        Script {
            phase_two_failures: 3.into(),
            ..Script::default()
        },
        None,
    );
    let (pa, pf) = (a.serve().await, flaky.serve().await);
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    let done = client
        .submit(Mode::TwoPhase, pair(&pa, &pf))
        .await
        .expect("decided commit even though one commit call failed");
    assert!(!done.complete, "phase 2 still running when submit returned");
    let coordinator = coord.coordinator.clone();
    eventually("committed", || {
        coordinator
            .get(done.gtid)
            .map(|r| r.state.name() == "COMMITTED")
            .unwrap_or(false)
    })
    .await;
    assert_eq!(flaky.failed_calls.load(Ordering::SeqCst), 3);
    assert_eq!(flaky.counts(), (1, 1, 0));
    let info = client.get(done.gtid).await.expect("get");
    let branch = &info.branches[1];
    assert_eq!(branch.attempts, 4, "three failures and one success");
    assert_eq!(
        branch.last_error, "",
        "an acknowledged branch shows no error (what shows is what still fails)"
    );
    assert_eq!(info.branches[0].attempts, 1);
}

// Rule 2: the commit decision is forced to disk before any commit call
// leaves the coordinator (journal shared by the log and the participants).
#[tokio::test]
async fn decision_is_forced_before_phase_two() {
    let journal = Journal::default();
    let coord = start_coordinator(Arc::new(RecordingLog::new(journal.clone()))).await;
    let a = Scripted::new("a", Script::default(), Some(journal.clone()));
    let b = Scripted::new("b", Script::default(), Some(journal.clone()));
    let (pa, pb_) = (a.serve().await, b.serve().await);
    let client = TransactionClient::connect(coord.url())
        .await
        .expect("connect");
    client
        .submit(Mode::TwoPhase, pair(&pa, &pb_))
        .await
        .expect("submit");
    let pos = |e: &str| {
        journal
            .position(e)
            .unwrap_or_else(|| panic!("no {e} in {:?}", journal.entries()))
    };
    let decided = pos("write:COMMITTING");
    // Recovery forces the log once before serving; the decision's own
    // force is the first one after the decision was written.
    let forced = journal
        .entries()
        .iter()
        .skip(decided)
        .position(|e| e == "forced")
        .map(|i| decided + i)
        .unwrap_or_else(|| panic!("no force after the decision: {:?}", journal.entries()));
    assert!(
        pos("prepare:a") < decided && pos("prepare:b") < decided,
        "{:?}",
        journal.entries()
    );
    assert!(decided < forced, "{:?}", journal.entries());
    assert!(
        forced < pos("commit:a") && forced < pos("commit:b"),
        "{:?}",
        journal.entries()
    );
}
