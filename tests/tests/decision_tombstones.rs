//! What retention may forget (DESIGN.md): a commit settled by hand keeps
//! its decision after its record is removed, a removed gtid is never
//! started again whatever the instances' clocks, and an expired decision
//! is never answered ABORT. The coordinators' clocks are set apart by
//! hand (`Clock::tokio` with another base) to play clock skew; sweeps are
//! run with `sweep_now`, as the background task would run them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tandem_coordinator::config::RetryPolicy;
use tandem_coordinator::engine::NewBranch;
use tandem_coordinator::error::CoordError;
use tandem_coordinator::log::{MemLog, SledLog, TxnLog};
use tandem_coordinator::model::{Decision, Gtid, Mode, TxState, now_ms};
use tandem_coordinator::runtime::{Clock, Environment};
use tandem_coordinator::{Coordinator, CoordinatorConfig};
use tandem_tests::down_net::{DOWN, DownNet as Net};

const RETENTION: Duration = Duration::from_secs(120);

/// Participants whose phase 2 fails at `DOWN` until told otherwise.
fn down_net() -> Arc<Net> {
    let net = Net::default();
    net.down.store(true, Ordering::SeqCst);
    Arc::new(net)
}

/// Tombstones are kept this long here.
const DECISION_RETENTION: Duration = Duration::from_secs(3600);
const MINUTE_MS: i64 = 60_000;

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        retention: RETENTION,
        decision_retention: Some(DECISION_RETENTION),
        retry: RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(20),
            max_attempts: Some(1),
            max_duration: None,
        },
        ..CoordinatorConfig::default()
    }
}

/// A coordinator on `log` whose clock reads `skew_ms` off the wall clock.
fn coordinator(log: Arc<dyn TxnLog>, net: &Arc<Net>, skew_ms: i64) -> Coordinator {
    let env = Environment {
        transport: Some(net.clone()),
        clock: Clock::tokio(now_ms().saturating_add_signed(skew_ms)),
        ..Environment::default()
    };
    Coordinator::with_environment(config(), log, env).expect("coordinator")
}

fn branches() -> Vec<NewBranch> {
    [("http://a:1", "a"), (DOWN, "b")]
        .map(|(endpoint, resource)| NewBranch {
            endpoint: endpoint.into(),
            resource: resource.into(),
            payload: Bytes::from_static(b"x"),
            mode: None,
            after: Vec::new(),
        })
        .to_vec()
}

/// A transaction with the client-chosen `gtid` committed, its branch at
/// `DOWN` STUCK and then settled by hand as committed: COMMITTED with one
/// branch its participant never acknowledged.
async fn commit_settled_by_hand(coord: &Coordinator, gtid: Gtid) {
    let out = coord
        .submit(
            Mode::TwoPhase,
            None,
            branches(),
            Some(gtid),
            Vec::new(),
            None,
        )
        .await
        .expect("submit");
    assert_eq!(out.state, TxState::Committing, "{out:?}");
    for _ in 0..200 {
        if coord.get(gtid).expect("get").state == TxState::Stuck {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(coord.get(gtid).expect("get").state, TxState::Stuck);
    let state = coord
        .resolve(gtid, 2, true, "ops".into(), "INC-1: applied by hand".into())
        .await
        .expect("resolve");
    assert_eq!(state, TxState::Committed);
}

fn gtid_now() -> Gtid {
    Gtid::now_v7()
}

async fn stop(coord: Coordinator) {
    coord.drain();
    coord.finish(Duration::from_secs(1)).await;
}

/// Opens the sled log in `dir`, waiting for an earlier handle's threads
/// to let go of its lock.
async fn reopen(dir: &std::path::Path) -> Arc<SledLog> {
    for _ in 0..100 {
        if let Ok(log) = SledLog::open(dir) {
            return Arc::new(log);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Arc::new(SledLog::open(dir).expect("reopen"))
}

// Rule: no gtid ever decided COMMIT is answered ABORT, whatever retention
// removed. A branch settled by hand never acknowledged; when retention
// removes the finished record, its decision stays (a tombstone), across a
// restart, and GetOutcome answers COMMIT; GetTransaction shows it
// compacted.
#[tokio::test]
async fn a_commit_settled_by_hand_is_still_commit_after_retention_on_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = down_net();
    let gtid = gtid_now();
    let coord = coordinator(reopen(dir.path()).await, &net, 0);
    coord.start_recovery().await.expect("start");
    commit_settled_by_hand(&coord, gtid).await;
    assert_eq!(
        coord.outcome(gtid).expect("outcome"),
        Some(Decision::Commit)
    );
    stop(coord).await;

    // The same log half an hour later: retention is due.
    let coord = coordinator(reopen(dir.path()).await, &net, 30 * MINUTE_MS);
    coord.start_recovery().await.expect("start");
    assert_eq!(coord.sweep_now().await.expect("sweep"), 1);
    let shown = coord.get(gtid).expect("compacted, still shown");
    assert!(shown.compacted && shown.branches.is_empty(), "{shown:?}");
    assert_eq!(
        (shown.state, shown.decision),
        (TxState::Committed, Some(Decision::Commit))
    );
    assert_eq!(
        coord.outcome(gtid).expect("outcome"),
        Some(Decision::Commit),
        "the participant of the branch settled by hand would roll it back"
    );
    stop(coord).await;

    // After a restart too: the tombstone is in the log.
    let coord = coordinator(reopen(dir.path()).await, &net, 30 * MINUTE_MS);
    coord.start_recovery().await.expect("start");
    assert_eq!(
        coord.outcome(gtid).expect("outcome"),
        Some(Decision::Commit)
    );
    // A gtid that never existed is still presumed abort.
    assert_eq!(
        coord.outcome(gtid_now()).expect("outcome"),
        Some(Decision::Abort)
    );
    stop(coord).await;
}

// Rule: a gtid that may have been purged is never started again, on any
// instance, whatever the clocks. Instance `first` (right clock) runs a
// transaction with a client-chosen gtid; instance `ahead`, whose clock
// runs 3 minutes ahead, sweeps the shared log and purges it 3 minutes
// early; a repeat then comes to instance `right` (right clock), to which
// the gtid is seconds old, young enough for its age check: only the
// horizon `ahead` left in the log can refuse it.
#[tokio::test]
async fn a_repeat_after_a_purge_by_a_clock_ahead_is_refused_elsewhere() {
    let log: Arc<MemLog> = Arc::new(MemLog::new());
    let net = down_net();
    net.down.store(false, Ordering::SeqCst);
    let gtid = gtid_now();
    let first = coordinator(log.clone(), &net, 0);
    first.start_recovery().await.expect("start");
    let out = first
        .submit(Mode::Tcc, None, branches(), Some(gtid), Vec::new(), None)
        .await
        .expect("submit");
    assert_eq!(out.state, TxState::Committed);
    assert_eq!(net.phase_one.load(Ordering::SeqCst), 2);
    let ahead = coordinator(log.clone(), &net, 3 * MINUTE_MS);
    assert_eq!(ahead.sweep_now().await.expect("sweep"), 1, "purged early");

    let right = coordinator(log, &net, 0);
    right.start_recovery().await.expect("start");
    let again = right
        .submit(Mode::Tcc, None, branches(), Some(gtid), Vec::new(), None)
        .await;
    assert_eq!(
        net.phase_one.load(Ordering::SeqCst),
        2,
        "the purged gtid was started a second time: {again:?}"
    );
    assert!(
        matches!(&again, Err(CoordError::InvalidArgument(m)) if m.contains("retention")),
        "{again:?}"
    );
    // Older gtids too, and a begin as well as a submit.
    let older = uuid::Builder::from_unix_timestamp_millis(now_ms() - 1000, &[3; 10]).into_uuid();
    let begun = right
        .begin(Mode::TwoPhase, None, Some(older), Vec::new(), None)
        .await;
    assert!(
        matches!(begun, Err(CoordError::InvalidArgument(_))),
        "{begun:?}"
    );
    // A gtid newer than anything purged starts (all of it may have run
    // within the gtid's millisecond).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fresh = right
        .begin(Mode::TwoPhase, None, Some(Gtid::now_v7()), Vec::new(), None)
        .await;
    assert!(fresh.is_ok(), "{fresh:?}");
}

// Rule: an expired tombstone is never read as ABORT. Past
// `decision_retention` the tombstone goes, and GetOutcome for that gtid
// (or any older one without a record) answers FAILED_PRECONDITION: the
// outcome is no longer known. A gtid newer than every expired tombstone
// is still presumed abort.
#[tokio::test]
async fn an_expired_decision_is_unknown_never_abort() {
    let log: Arc<MemLog> = Arc::new(MemLog::new());
    let net = down_net();
    let gtid = gtid_now();
    let now = coordinator(log.clone(), &net, 0);
    now.start_recovery().await.expect("start");
    commit_settled_by_hand(&now, gtid).await;
    let later = coordinator(log.clone(), &net, 30 * MINUTE_MS);
    assert_eq!(later.sweep_now().await.expect("sweep"), 1);
    assert_eq!(later.outcome(gtid).expect("kept"), Some(Decision::Commit));
    // Past the decision retention.
    let much_later = coordinator(log, &net, 90 * MINUTE_MS);
    much_later.sweep_now().await.expect("sweep");
    let forgotten = much_later.outcome(gtid);
    assert!(
        matches!(forgotten, Err(CoordError::Forgotten(g)) if g == gtid),
        "{forgotten:?}"
    );
    let status = tonic::Status::from(forgotten.unwrap_err());
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(much_later.get(gtid).is_err(), "nothing left to show");
    // (All of it may have run within the gtid's millisecond.)
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        much_later.outcome(gtid_now()).expect("outcome"),
        Some(Decision::Abort),
        "a new gtid is still presumed abort"
    );
}

// Rule: a gtid retention removed is never presumed ABORT. A commit every
// branch acknowledged keeps no tombstone; a GetOutcome for it that comes
// late (asked while a branch was in doubt, held by a coordinator paused
// past retention, answered after the purge) must not hear ABORT: it hears
// FAILED_PRECONDITION, no longer known. (Found by the cluster simulation:
// a participant's question waited out a pause and was answered ABORT.)
#[tokio::test]
async fn a_removed_commit_is_never_answered_abort() {
    let log: Arc<MemLog> = Arc::new(MemLog::new());
    let net = down_net();
    net.down.store(false, Ordering::SeqCst);
    let gtid = gtid_now();
    let now = coordinator(log.clone(), &net, 0);
    now.start_recovery().await.expect("start");
    now.submit(
        Mode::TwoPhase,
        None,
        branches(),
        Some(gtid),
        Vec::new(),
        None,
    )
    .await
    .expect("submit");
    for _ in 0..200 {
        if now.get(gtid).expect("get").state == TxState::Committed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(now.get(gtid).expect("get").state, TxState::Committed);
    let later = coordinator(log, &net, 30 * MINUTE_MS);
    assert_eq!(later.sweep_now().await.expect("sweep"), 1, "purged");
    let answer = later.outcome(gtid);
    assert!(
        matches!(answer, Err(CoordError::Forgotten(g)) if g == gtid),
        "a removed commit was answered {answer:?}"
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        later.outcome(gtid_now()).expect("outcome"),
        Some(Decision::Abort),
        "a gtid no record ever covered is still presumed abort"
    );
}
