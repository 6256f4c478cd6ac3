//! Every abort records its cause as fields (`TxnRecord::abort`) beside the
//! text, and the fields say which branch and what its participant said.

use super::*;
use crate::model::MAX_STORED_TEXT;

use bytes::Bytes;

const NOW: u64 = 1_000;
const DEADLINE: u64 = 61_000;

fn one_shot(n: u32) -> Txn {
    let branches = (1..=n)
        .map(|i| NewBranch {
            endpoint: format!("http://127.0.0.1:{}", 9000 + i),
            resource: format!("bank-{i}"),
            payload: Bytes::from_static(b"p"),
            mode: None,
            after: Vec::new(),
        })
        .collect();
    Txn::submit(Gtid::now_v7(), Mode::TwoPhase, NOW, DEADLINE, branches).0
}

fn vote(t: &mut Txn, branch: BranchId, vote: Vote) {
    t.handle(Event::PhaseOne { branch, vote }, NOW)
        .expect("phase one");
}

fn abort_of(t: &Txn) -> AbortInfo {
    t.record().abort.clone().expect("an abort is recorded")
}

#[test]
fn a_no_vote_names_its_branch_and_keeps_the_participants_reason() {
    let mut t = one_shot(3);
    vote(&mut t, 1, Vote::Yes(Bytes::new()));
    vote(&mut t, 2, Vote::No("insufficient funds".into()));
    let a = abort_of(&t);
    assert_eq!(a.cause, AbortCause::VotedNo);
    assert_eq!((a.branch, a.resource.as_str()), (2, "bank-2"));
    assert_eq!(a.detail, "insufficient funds");
    assert_eq!(
        t.record().reason,
        "branch 2 (bank-2) voted no: insufficient funds"
    );
}

#[test]
fn an_empty_no_is_said_without_a_dangling_colon() {
    let mut t = one_shot(1);
    vote(&mut t, 1, Vote::No(String::new()));
    assert_eq!(abort_of(&t).detail, "");
    assert_eq!(t.record().reason, "branch 1 (bank-1) voted no");
}

#[test]
fn a_phase_one_failure_is_its_own_cause() {
    let mut t = one_shot(2);
    vote(
        &mut t,
        2,
        Vote::Failed("unavailable: connection refused".into()),
    );
    let a = abort_of(&t);
    assert_eq!(a.cause, AbortCause::PhaseOneFailed);
    assert_eq!(
        (a.branch, a.detail.as_str()),
        (2, "unavailable: connection refused")
    );
}

#[test]
fn a_long_reason_is_capped_in_the_fields_too() {
    let mut t = one_shot(1);
    vote(&mut t, 1, Vote::No("x".repeat(10 * MAX_STORED_TEXT)));
    assert!(abort_of(&t).detail.len() <= MAX_STORED_TEXT);
}

#[test]
fn aborts_no_branch_caused_carry_no_branch() {
    let cases: [(Event, AbortCause, &str); 3] = [
        (
            Event::Rollback {
                reason: "customer left".into(),
            },
            AbortCause::ClientRollback,
            "customer left",
        ),
        (
            Event::OperatorAbort {
                reason: "INC-42".into(),
            },
            AbortCause::OperatorAbort,
            "INC-42",
        ),
        (Event::DeadlinePassed, AbortCause::Deadline, ""),
    ];
    for (event, cause, detail) in cases {
        let (mut t, _) = Txn::begin(Gtid::now_v7(), Mode::Tcc, NOW, DEADLINE);
        t.handle(event, NOW).expect("abort");
        let a = abort_of(&t);
        assert_eq!((a.cause, a.branch, a.detail.as_str()), (cause, 0, detail));
        assert!(a.resource.is_empty());
    }
}

#[test]
fn recovery_of_an_undecided_record_says_so() {
    let rec = one_shot(1).record().clone();
    let (t, _) = Txn::recover(rec, NOW);
    assert_eq!(abort_of(&t).cause, AbortCause::CoordinatorRestart);
}

#[test]
fn a_later_rollback_keeps_the_first_cause() {
    let mut t = one_shot(2);
    vote(&mut t, 1, Vote::No("no".into()));
    t.handle(
        Event::Rollback {
            reason: "late".into(),
        },
        NOW,
    )
    .expect("a repeat is a no-op");
    assert_eq!(abort_of(&t).cause, AbortCause::VotedNo);
}

#[test]
fn a_commit_decision_carries_no_abort() {
    let mut t = one_shot(1);
    vote(&mut t, 1, Vote::Yes(Bytes::new()));
    assert_eq!(t.record().abort, None);
}

// A commit decision the store refused (another coordinator presumed the
// transaction aborted before its first write) turns into a forced abort:
// nothing shows or goes out before that abort is durable, then every
// branch is rolled back.
#[test]
fn a_commit_refused_by_a_presumed_abort_becomes_a_forced_abort() {
    let mut t = one_shot(2);
    t.handle(
        Event::PhaseOne {
            branch: 1,
            vote: Vote::Yes(Bytes::new()),
        },
        NOW,
    )
    .expect("vote");
    let cmds = t
        .handle(
            Event::PhaseOne {
                branch: 2,
                vote: Vote::Yes(Bytes::new()),
            },
            NOW,
        )
        .expect("vote");
    assert_eq!(cmds, vec![Command::ForceDecision]);
    let cmds = t.handle(Event::PresumedAborted, NOW).expect("refused");
    assert_eq!(cmds, vec![Command::ForceDecision]);
    assert_eq!(t.record().decision, Some(Decision::Abort));
    assert_eq!(abort_of(&t).cause, AbortCause::CoordinatorRestart);
    // Still pending: others see it undecided.
    assert_eq!(t.durable_decision(), None);
    assert_eq!(t.visible_record().state, TxState::Preparing);
    let cmds = t.handle(Event::DecisionDurable, NOW).expect("durable");
    let rollbacks: Vec<_> = cmds
        .iter()
        .filter(|c| matches!(c, Command::PhaseTwo { commit: false, .. }))
        .collect();
    assert_eq!(rollbacks.len(), 2, "{cmds:?}");
    // Once durable, a second refusal changes nothing.
    assert!(
        t.handle(Event::PresumedAborted, NOW)
            .expect("late")
            .is_empty()
    );
    assert_eq!(t.durable_decision(), Some(Decision::Abort));
}

// Refused while undecided (the first record's flush met the presumed
// abort, phase 1 still out): a forced abort too; refused again while that
// abort is being forced, nothing (the caller stops rather than loop).
#[test]
fn an_undecided_transaction_presumed_aborted_aborts_forced_once() {
    let mut t = one_shot(2);
    let cmds = t.handle(Event::PresumedAborted, NOW).expect("refused");
    assert_eq!(cmds, vec![Command::ForceDecision]);
    assert_eq!(t.record().decision, Some(Decision::Abort));
    assert_eq!(t.durable_decision(), None);
    assert!(
        t.handle(Event::PresumedAborted, NOW)
            .expect("again")
            .is_empty()
    );
}
