//! The rules of a store several coordinators share, as scenarios every
//! shared [`TxnLog`] must pass: [`super::PgLog`] on a real PostgreSQL and
//! [`super::SharedMemLog`] on a [`super::SharedStore`]. Passing the same
//! scenarios is what makes the simulated store the same checked
//! specification as the PostgreSQL one.
//!
//! A [`SharedHarness`] is one fresh store: it opens incarnations of named
//! instances on it and makes one incarnation's leases run out (it stops
//! renewing, as a paused process does) while the others keep theirs.
//!
//! ```no_run
//! # async fn t<H: tandem_log::shared_conformance::SharedHarness>(
//! #     fresh_store: impl AsyncFn() -> H) {
//! use tandem_log::shared_conformance;
//! shared_conformance::run_all(fresh_store).await;
//! # }
//! ```
//!
//! Each check states its rule and panics, naming itself, when the store
//! breaks it.

mod presumed;

use std::future::Future;
use std::sync::Arc;

pub use presumed::{
    a_presumed_abort_gives_way_to_the_owners_abort, a_presumed_abort_refuses_a_later_first_write,
    a_presumed_abort_returns_a_row_written_first,
};

use super::{LogError, Ownership, TxnLog, conformance::sample_record};
use crate::model::{Decision, Gtid, Mode, TxState, TxnRecord};

/// One fresh shared store and the means to drive its leases.
pub trait SharedHarness {
    /// The log of one incarnation.
    type Log: TxnLog;

    /// A new incarnation (a process start) of instance `name`, reached at
    /// `address`, on this store.
    fn open(&self, name: &str, address: &str) -> Arc<Self::Log>;

    /// Lets more than a lease pass on the store's clock while every
    /// incarnation not expired renews its leases.
    fn pass_lease(&self) -> impl Future<Output = ()>;

    /// `log` stops renewing for good (a process paused without knowing)
    /// and its leases run out on the store's clock; the others keep
    /// theirs. Its calls still reach the store.
    fn expire(&self, log: &Self::Log) -> impl Future<Output = ()>;
}

/// Every check, each on a fresh store from `fresh`.
pub async fn run_all<H: SharedHarness>(fresh: impl AsyncFn() -> H) {
    run_all_but_removal(&fresh).await;
    a_write_after_removal_is_fenced(&fresh().await).await;
}

/// Every check but [`a_write_after_removal_is_fenced`] (which the
/// PostgreSQL suite runs as a test of its own), each on a fresh store.
pub async fn run_all_but_removal<H: SharedHarness>(fresh: &impl AsyncFn() -> H) {
    a_first_write_creates_the_row(&fresh().await).await;
    a_second_first_write_is_refused(&fresh().await).await;
    a_stale_epoch_is_fenced_even_from_the_owner(&fresh().await).await;
    a_decision_never_changes(&fresh().await).await;
    an_expired_owner_is_claimed_and_fenced(&fresh().await).await;
    a_restart_takes_its_rows_at_once(&fresh().await).await;
    locate_reports_owner_and_liveness(&fresh().await).await;
    retention_removes_only_what_it_is_asked_to(&fresh().await).await;
    a_first_write_under_the_purge_horizon_is_fenced(&fresh().await).await;
    the_store_tells_its_clock(&fresh().await).await;
    a_presumed_abort_refuses_a_later_first_write(&fresh().await).await;
    a_presumed_abort_returns_a_row_written_first(&fresh().await).await;
    a_presumed_abort_gives_way_to_the_owners_abort(&fresh().await).await;
}

fn address(name: &str) -> String {
    format!("{name}.cluster.test:7070")
}

fn open<H: SharedHarness>(h: &H, name: &str) -> Arc<H::Log> {
    h.open(name, &address(name))
}

async fn created(log: &impl TxnLog, state: TxState, decision: Option<Decision>) -> TxnRecord {
    let mut rec = sample_record(Mode::TwoPhase, 2);
    rec.state = state;
    rec.decision = decision;
    log.write(&rec).expect("write");
    log.force_txn(&rec.gtid).await.expect("first write");
    rec
}

fn located(log: &impl TxnLog, gtid: &Gtid) -> Ownership {
    log.locate(gtid).expect("locate").expect("a located row")
}

/// A transaction's first write creates its row, owned by the writer at
/// epoch 1; every instance reads it.
pub async fn a_first_write_creates_the_row<H: SharedHarness>(h: &H) {
    let (a, b) = (open(h, "a"), open(h, "b"));
    let rec = created(&*a, TxState::Preparing, None).await;
    assert_eq!(
        b.get(&rec.gtid).expect("get").as_ref(),
        Some(&rec),
        "a_first_write_creates_the_row: another instance reads it"
    );
    let want = Ownership {
        here: false,
        live: true,
        name: "a".into(),
        address: address("a"),
        epoch: 1,
    };
    assert_eq!(
        located(&*b, &rec.gtid),
        want,
        "a_first_write_creates_the_row"
    );
    assert!(
        located(&*a, &rec.gtid).here,
        "a_first_write_creates_the_row: here"
    );
}

/// The first write of a gtid another coordinator started first is
/// refused, for that transaction alone: the rest of the batch lands, the
/// log does not latch, further writes of that gtid are refused, and the
/// store keeps the first starter's record.
pub async fn a_second_first_write_is_refused<H: SharedHarness>(h: &H) {
    let (a, b) = (open(h, "a"), open(h, "b"));
    let rec = created(&*a, TxState::Active, None).await;
    let mut theirs = rec.clone();
    theirs.state = TxState::Preparing;
    theirs.branches.truncate(1);
    let other = sample_record(Mode::Tcc, 1);
    b.write(&theirs).expect("buffered");
    b.write(&other).expect("buffered");
    b.force()
        .await
        .expect("a_second_first_write_is_refused: the batch's rest lands");
    let err = b
        .force_txn(&rec.gtid)
        .await
        .expect_err("a_second_first_write_is_refused");
    assert!(
        matches!(err, LogError::Refused(g) if g == rec.gtid),
        "{err:?}"
    );
    assert!(
        b.refused(&rec.gtid),
        "a_second_first_write_is_refused: remembered"
    );
    assert!(
        matches!(b.write(&theirs), Err(LogError::Refused(_))),
        "a_second_first_write_is_refused: a refused gtid is written again"
    );
    assert_eq!(
        a.get(&rec.gtid).expect("get"),
        Some(rec),
        "first starter's record"
    );
    assert_eq!(a.get(&other.gtid).expect("get"), Some(other), "the rest");
    let more = created(&*b, TxState::Active, None).await;
    assert!(a.get(&more.gtid).expect("get").is_some(), "b latched");
}

/// A write after retention removed the row is fenced: only a
/// transaction's first write may create its row. A is paused past its
/// lease, B takes the transaction over and aborts it, retention removes
/// the row, A resumes and forces its commit: refused, A's log latches,
/// and the row stays gone (issue 22, finding 1).
pub async fn a_write_after_removal_is_fenced<H: SharedHarness>(h: &H) {
    let (a, b) = (open(h, "a"), open(h, "b"));
    let mut rec = created(&*a, TxState::Preparing, None).await;
    h.expire(&a).await;
    let taken = b.take_over_expired(100).await.expect("sweep");
    assert_eq!(
        taken,
        vec![rec.gtid],
        "a_write_after_removal_is_fenced: claim"
    );
    let mut aborted = b.get(&rec.gtid).expect("get").expect("record");
    aborted.state = TxState::Aborted;
    aborted.decision = Some(Decision::Abort);
    b.write(&aborted).expect("write");
    b.force().await.expect("force");
    b.remove(&rec.gtid).expect("retention");
    b.force().await.expect("force");
    assert!(b.get(&rec.gtid).expect("get").is_none(), "removed");

    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    a.write(&rec).expect("buffered");
    let forced = a.force().await;
    assert!(
        matches!(forced, Err(LogError::Fenced(_))),
        "a_write_after_removal_is_fenced: the former owner's write after retention landed \
         ({forced:?}; issue 22 finding 1)"
    );
    assert!(
        b.get(&rec.gtid).expect("get").is_none(),
        "a_write_after_removal_is_fenced: the row came back: {:?}",
        b.get(&rec.gtid)
    );
    assert!(
        a.write(&rec).is_err(),
        "a_write_after_removal_is_fenced: not latched"
    );
}

/// A write carries the epoch its writer read; at any other epoch it is
/// fenced, even from the row's owner (an owner that lost a row and
/// claimed it back cannot write from its stale copy).
pub async fn a_stale_epoch_is_fenced_even_from_the_owner<H: SharedHarness>(h: &H) {
    let first = open(h, "a");
    let stale = created(&*first, TxState::Preparing, None).await;
    let second = open(h, "a");
    let mut rec = second.get(&stale.gtid).expect("get").expect("record");
    assert_eq!(rec.epoch, 2, "a_stale_epoch_is_fenced: the restart's claim");
    rec.branches[0].attempts = 5;
    second.write(&rec).expect("write");
    second
        .force()
        .await
        .expect("a_stale_epoch_is_fenced: the owner at its epoch");
    second.write(&stale).expect("buffered");
    let err = second
        .force()
        .await
        .expect_err("a_stale_epoch_is_fenced_even_from_the_owner");
    assert!(matches!(err, LogError::Fenced(_)), "{err:?}");
}

/// A row's decision is written once: a later write with the same decision
/// lands, one with another (or none) is fenced, even from the owner.
pub async fn a_decision_never_changes<H: SharedHarness>(h: &H) {
    let (a, b) = (open(h, "a"), open(h, "b"));
    let mut rec = created(&*a, TxState::Aborting, Some(Decision::Abort)).await;
    rec.branches[0].attempts = 3;
    a.write(&rec).expect("write");
    a.force()
        .await
        .expect("a_decision_never_changes: the same decision again");
    let mut changed = rec.clone();
    changed.state = TxState::Committing;
    changed.decision = Some(Decision::Commit);
    a.write(&changed).expect("buffered");
    let err = a
        .force()
        .await
        .expect_err("a_decision_never_changes: changed");
    assert!(matches!(err, LogError::Fenced(_)), "{err:?}");
    let stored = b.get(&rec.gtid).expect("get").expect("record");
    assert_eq!(stored, rec, "a_decision_never_changes: the store's record");

    let c = open(h, "c");
    let undecided = created(&*c, TxState::Committing, Some(Decision::Commit)).await;
    let mut cleared = undecided.clone();
    cleared.state = TxState::Preparing;
    cleared.decision = None;
    c.write(&cleared).expect("buffered");
    assert!(
        c.force().await.is_err(),
        "a_decision_never_changes: a write without the decision landed"
    );
    assert_eq!(b.get(&undecided.gtid).expect("get"), Some(undecided));
}

/// A live owner's rows are never claimed; once its lease ran out on the
/// store's clock they are, by one instance, oldest first, at most `limit`
/// per sweep or one gtid alone, each at epoch + 1; the former owner's
/// next write is fenced and its log latches; the new owner's decision
/// stays.
pub async fn an_expired_owner_is_claimed_and_fenced<H: SharedHarness>(h: &H) {
    let (a, b, c) = (open(h, "a"), open(h, "b"), open(h, "c"));
    let mut recs = Vec::new();
    for _ in 0..4 {
        recs.push(created(&*a, TxState::Preparing, None).await);
    }
    let done = created(&*a, TxState::Committed, Some(Decision::Commit)).await;
    h.pass_lease().await;
    assert!(
        b.take_over_expired(100).await.expect("sweep").is_empty(),
        "an_expired_owner_is_claimed: a live owner's rows claimed"
    );
    assert!(
        b.take_over(&recs[0].gtid).await.expect("claim").is_empty(),
        "live, alone"
    );

    h.expire(&a).await;
    let alone = b.take_over(&recs[3].gtid).await.expect("claim");
    assert_eq!(
        alone,
        vec![recs[3].gtid],
        "an_expired_owner_is_claimed: one gtid"
    );
    let mut swept = b.take_over_expired(2).await.expect("sweep");
    assert_eq!(swept.len(), 2, "an_expired_owner_is_claimed: the limit");
    swept.extend(c.take_over_expired(100).await.expect("sweep"));
    swept.sort();
    let mut want = vec![recs[0].gtid, recs[1].gtid, recs[2].gtid];
    want.sort();
    assert_eq!(
        swept, want,
        "an_expired_owner_is_claimed: each claimed once"
    );
    assert!(
        b.take_over_expired(100).await.expect("sweep").is_empty(),
        "claimed twice"
    );
    assert!(
        !b.take_over_expired(100)
            .await
            .expect("sweep")
            .contains(&done.gtid),
        "an_expired_owner_is_claimed: a finished row claimed"
    );
    let moved = located(&*a, &recs[3].gtid);
    assert_eq!(
        (moved.here, moved.epoch, moved.name.as_str()),
        (false, 2, "b")
    );

    let mut aborted = b.get(&recs[3].gtid).expect("get").expect("record");
    assert_eq!(
        aborted.epoch, 2,
        "an_expired_owner_is_claimed: read at the new epoch"
    );
    aborted.state = TxState::Aborting;
    aborted.decision = Some(Decision::Abort);
    b.write(&aborted).expect("write");
    b.force().await.expect("the new owner writes");

    let mut late = recs[3].clone();
    late.state = TxState::Committing;
    late.decision = Some(Decision::Commit);
    a.write(&late).expect("buffered");
    let err = a
        .force()
        .await
        .expect_err("an_expired_owner_is_claimed: the former owner wrote");
    assert!(matches!(err, LogError::Fenced(_)), "{err:?}");
    assert!(a.write(&late).is_err(), "a fenced log takes more writes");
    assert!(a.force().await.is_err(), "a fenced log forces again");
    let stored = c.get(&recs[3].gtid).expect("get").expect("record");
    assert_eq!(
        stored.decision,
        Some(Decision::Abort),
        "the store's decision changed"
    );

    // A second claim: epoch 3.
    h.expire(&b).await;
    assert!(
        c.take_over(&recs[3].gtid)
            .await
            .expect("claim")
            .contains(&recs[3].gtid)
    );
    assert_eq!(located(&*c, &recs[3].gtid).epoch, 3, "epoch + 1 per claim");
}

/// A restart (a new incarnation of the same name) owns its predecessor's
/// unfinished rows at once, lease or not, at epoch + 1; finished rows are
/// left alone; the predecessor's next write is fenced; no other instance
/// may claim them.
pub async fn a_restart_takes_its_rows_at_once<H: SharedHarness>(h: &H) {
    let (first, b) = (open(h, "a"), open(h, "b"));
    let stuck = created(&*first, TxState::Stuck, Some(Decision::Commit)).await;
    let running = created(&*first, TxState::Preparing, None).await;
    let done = created(&*first, TxState::Aborted, Some(Decision::Abort)).await;
    let second = open(h, "a");
    let mut own: Vec<(Gtid, u64)> = second
        .scan_own(None, &[], 100)
        .expect("scan own")
        .into_iter()
        .map(|r| (r.gtid, r.epoch))
        .collect();
    own.sort();
    let mut want = vec![(stuck.gtid, 2), (running.gtid, 2)];
    want.sort();
    assert_eq!(own, want, "a_restart_takes_its_rows_at_once: owned");
    assert!(
        first
            .scan_own(None, &[], 100)
            .expect("scan own")
            .iter()
            .all(|r| r.gtid == done.gtid),
        "a_restart_takes_its_rows_at_once: the predecessor still owns an unfinished row"
    );
    assert_eq!(
        located(&*second, &done.gtid).name,
        "",
        "the predecessor left the cluster"
    );
    assert!(
        b.take_over_expired(100).await.expect("sweep").is_empty(),
        "b claimed"
    );
    let mut late = running.clone();
    late.state = TxState::Aborting;
    late.decision = Some(Decision::Abort);
    // The predecessor may have latched already (its renewal found its
    // name taken); either way its write does not land.
    let wrote = match first.write(&late) {
        Ok(()) => first.force().await,
        Err(e) => Err(e),
    };
    assert!(
        matches!(wrote, Err(LogError::Fenced(_) | LogError::Halted(_))),
        "a_restart_takes_its_rows_at_once: the predecessor wrote: {wrote:?}"
    );
    let stored = second.get(&running.gtid).expect("get").expect("record");
    assert_eq!(
        (stored.state, stored.decision, stored.epoch),
        (TxState::Preparing, None, 2)
    );
}

/// `locate` names the owner, where it serves and the epoch, says whether
/// it is this incarnation and whether its lease runs (a finished row is
/// always live); an unknown gtid has no owner.
pub async fn locate_reports_owner_and_liveness<H: SharedHarness>(h: &H) {
    let (a, b) = (open(h, "a"), open(h, "b"));
    assert_eq!(a.locate(&Gtid::now_v7()).expect("locate"), None, "unknown");
    let running = created(&*a, TxState::Active, None).await;
    let done = created(&*a, TxState::Committed, Some(Decision::Commit)).await;
    let mut from_b = located(&*b, &running.gtid);
    assert_eq!(
        (
            from_b.here,
            from_b.live,
            from_b.name.as_str(),
            from_b.address.clone(),
            from_b.epoch
        ),
        (false, true, "a", address("a"), 1),
        "locate_reports_owner_and_liveness: from another instance"
    );
    from_b.here = true;
    assert_eq!(located(&*a, &running.gtid), from_b, "from the owner");
    h.expire(&a).await;
    assert!(
        !located(&*b, &running.gtid).live,
        "an expired lease reads live"
    );
    assert!(
        located(&*b, &done.gtid).live,
        "a finished row reads not live"
    );
}

/// Retention removes exactly the finished rows it is asked to; a row
/// still unfinished when the removal lands stays (someone drives it);
/// removing an unknown gtid is no error.
pub async fn retention_removes_only_what_it_is_asked_to<H: SharedHarness>(h: &H) {
    let (a, b) = (open(h, "a"), open(h, "b"));
    let unfinished = created(&*a, TxState::Preparing, None).await;
    let gone = created(&*a, TxState::Committed, Some(Decision::Commit)).await;
    let also_kept = created(&*b, TxState::Aborted, Some(Decision::Abort)).await;
    a.remove(&gone.gtid).expect("remove");
    a.remove(&Gtid::now_v7()).expect("remove unknown");
    a.force().await.expect("force");
    b.remove(&unfinished.gtid).expect("remove");
    b.force().await.expect("force");
    assert!(
        b.get(&gone.gtid).expect("get").is_none(),
        "retention: not removed"
    );
    let left: Vec<Gtid> = b
        .scan(None, &[], 100)
        .expect("scan")
        .into_iter()
        .map(|r| r.gtid)
        .collect();
    let mut want = vec![unfinished.gtid, also_kept.gtid];
    want.sort();
    assert_eq!(left, want, "retention_removes_only_what_it_is_asked_to");
    assert_eq!(
        a.get(&unfinished.gtid).expect("get"),
        Some(unfinished),
        "retention removed an unfinished row"
    );
}

/// A first write of a gtid the retention horizon covers is never written
/// (it is fenced): its row may be one retention removed, and the write one
/// that a process paused past retention still held, while another
/// coordinator took the transaction over, finished it and purged it.
pub async fn a_first_write_under_the_purge_horizon_is_fenced<H: SharedHarness>(h: &H) {
    let (a, b) = (open(h, "a"), open(h, "b"));
    let ms = crate::model::now_ms();
    let v7 = |ms: u64, n: u8| uuid::Builder::from_unix_timestamp_millis(ms, &[n; 10]).into_uuid();
    let mut purged = sample_record(Mode::TwoPhase, 2);
    purged.gtid = v7(ms, 2);
    purged.state = TxState::Committed;
    purged.decision = Some(Decision::Commit);
    b.write(&purged).expect("write");
    b.force_txn(&purged.gtid).await.expect("first write");
    if !b.compacts() {
        return;
    }
    b.purge(&[crate::Purge {
        gtid: purged.gtid,
        tombstone: None,
    }])
    .expect("purge");
    b.force().await.expect("force");
    assert!(b.get(&purged.gtid).expect("get").is_none(), "purged");

    let mut held = sample_record(Mode::TwoPhase, 2);
    held.gtid = v7(ms.saturating_sub(1000), 1);
    held.state = TxState::Committing;
    held.decision = Some(Decision::Commit);
    a.write(&held).expect("buffered");
    let forced = a.force().await;
    assert!(
        matches!(forced, Err(LogError::Fenced(_))),
        "a_first_write_under_the_purge_horizon_is_fenced: a first write of a gtid older than \
         a purged one landed ({forced:?})"
    );
    assert!(
        b.get(&held.gtid).expect("get").is_none(),
        "a_first_write_under_the_purge_horizon_is_fenced: the row was created"
    );
    // A gtid newer than the horizon is a new transaction as ever.
    std::thread::sleep(std::time::Duration::from_millis(3));
    created(&*b, TxState::Preparing, None).await;
}

/// Rule: a shared store tells its own clock, the same to every instance
/// (each instance's clock is checked against it at start:
/// `runtime/clock_offset.rs`), and that clock does not run backwards.
pub async fn the_store_tells_its_clock<H: SharedHarness>(h: &H) {
    let (a, b) = (open(h, "a"), open(h, "b"));
    let first = a.store_now_ms().expect("read the clock");
    let second = b.store_now_ms().expect("read the clock");
    match (first, second) {
        (Some(first), Some(second)) => assert!(
            second >= first,
            "the_store_tells_its_clock: read {first} then {second}"
        ),
        other => panic!("the_store_tells_its_clock: a shared store said {other:?}"),
    }
}
