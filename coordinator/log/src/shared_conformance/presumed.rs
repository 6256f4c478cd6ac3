//! The presumed abort of a shared store ([`TxnLog::presume_abort`]): the
//! rule that lets a one-shot transaction be written only with its decision.

use super::{SharedHarness, created, open};
use crate::model::{Decision, Gtid, Mode, TxState, TxnRecord};
use crate::{LogError, Presumed, TxnLog, conformance::sample_record};

fn marker(gtid: Gtid) -> TxnRecord {
    let mut m = TxnRecord::new(gtid, Mode::TwoPhase, TxState::Aborted, 1_000, 1_000);
    m.decision = Some(Decision::Abort);
    m
}

/// A presumed abort where there is no row writes the abort (every
/// instance reads it), and the first write of a coordinator that began the
/// gtid and decides after it is refused, whatever it decided; asked again,
/// the store returns that abort.
pub async fn a_presumed_abort_refuses_a_later_first_write<H: SharedHarness>(h: &H) {
    let (a, b) = (open(h, "a"), open(h, "b"));
    let mut rec = sample_record(Mode::TwoPhase, 2);
    assert_eq!(
        b.presume_abort(&marker(rec.gtid)).expect("presume"),
        Presumed::Aborted,
        "a_presumed_abort_refuses_a_later_first_write: no row, so the abort is written"
    );
    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    a.write(&rec).expect("write");
    let forced = a.force_txn(&rec.gtid).await;
    assert!(
        matches!(forced, Err(LogError::Refused(g)) if g == rec.gtid),
        "a_presumed_abort_refuses_a_later_first_write: the owner's commit after it: {forced:?}"
    );
    for log in [&a, &b] {
        let stored = log.get(&rec.gtid).expect("get").expect("a row");
        assert_eq!(
            (stored.state, stored.decision),
            (TxState::Aborted, Some(Decision::Abort)),
            "a_presumed_abort_refuses_a_later_first_write: every instance reads the abort"
        );
    }
    match b.presume_abort(&marker(rec.gtid)).expect("presume again") {
        Presumed::Found(r) => assert_eq!(
            r.decision,
            Some(Decision::Abort),
            "a_presumed_abort_refuses_a_later_first_write: asked again"
        ),
        other => panic!("a_presumed_abort_refuses_a_later_first_write: asked again: {other:?}"),
    }
}

/// The coordinator that began the gtid, refused by a presumed abort,
/// aborts it itself: its abort (with its branches) replaces the presumed
/// row and is its own from then on; a commit never does.
pub async fn a_presumed_abort_gives_way_to_the_owners_abort<H: SharedHarness>(h: &H) {
    let (a, b) = (open(h, "a"), open(h, "b"));
    let mut rec = sample_record(Mode::TwoPhase, 2);
    b.presume_abort(&marker(rec.gtid)).expect("presume");
    rec.state = TxState::Committing;
    rec.decision = Some(Decision::Commit);
    a.write(&rec).expect("write");
    assert!(a.force_txn(&rec.gtid).await.is_err());
    a.accept_presumed_abort(&rec.gtid);
    rec.state = TxState::Aborting;
    rec.decision = Some(Decision::Abort);
    a.write(&rec).expect("write the abort");
    a.force_txn(&rec.gtid)
        .await
        .expect("a_presumed_abort_gives_way_to_the_owners_abort: the owner's abort lands");
    let stored = b.get(&rec.gtid).expect("get").expect("a row");
    assert_eq!(
        (stored.state, stored.branches.len()),
        (TxState::Aborting, 2),
        "a_presumed_abort_gives_way_to_the_owners_abort: the owner's record replaced it"
    );
    assert!(
        b.locate(&rec.gtid)
            .expect("locate")
            .is_some_and(|o| o.name == "a"),
        "a_presumed_abort_gives_way_to_the_owners_abort: owned by the one that began it"
    );
    // Its later writes land as the owner's.
    rec.state = TxState::Aborted;
    a.write(&rec).expect("write the end");
    a.force_txn(&rec.gtid)
        .await
        .expect("a_presumed_abort_gives_way_to_the_owners_abort: the end lands");
}

/// A presumed abort where a row is there writes nothing and returns it:
/// a decided commit stays a commit, an undecided row stays undecided.
pub async fn a_presumed_abort_returns_a_row_written_first<H: SharedHarness>(h: &H) {
    let (a, b) = (open(h, "a"), open(h, "b"));
    for (state, decision) in [
        (TxState::Committing, Some(Decision::Commit)),
        (TxState::Preparing, None),
    ] {
        let rec = created(&*a, state, decision).await;
        match b.presume_abort(&marker(rec.gtid)).expect("presume") {
            Presumed::Found(r) => assert_eq!(
                (r.state, r.decision),
                (state, decision),
                "a_presumed_abort_returns_a_row_written_first"
            ),
            other => panic!("a_presumed_abort_returns_a_row_written_first: {other:?}"),
        }
        let stored = a.get(&rec.gtid).expect("get").expect("a row");
        assert_eq!(
            stored.decision, decision,
            "a_presumed_abort_returns_a_row_written_first: the row is unchanged"
        );
    }
}
